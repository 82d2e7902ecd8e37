"""Size-aware attention, the op layer: both forms (a float mask on the CPU, the folded q/k
channel for GPUs) equal an explicit log(size) bias and keep the flash kernel; token sizes count
original patches. (The pass that inserts it:
tests/passes/test_size_aware_attention.py.)"""

import pytest
import torch
import torch.nn.functional as F

from mpm_fx.ops.size_aware import (
    add_log_sizes,
    folded_sdpa,
    log_token_sizes,
    proportional_sdpa,
)


@pytest.mark.parametrize("form", [proportional_sdpa, folded_sdpa])
@pytest.mark.parametrize("shape", [(2, 3, 37, 64), (6, 37, 30)])  # (B, H, T, E) and (B*H, T, E)
@pytest.mark.parametrize("padded", [False, True])
def test_both_forms_equal_an_explicit_bias(shape, padded, form):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape, dtype=torch.float64) for _ in range(3))
    B, T = 2, shape[-2]
    log_sizes = torch.randint(1, 5, (B, T)).double().log()
    lead, heads = shape[:-2], 3  # batch-major leading dims: (B, H) or (B * H,)
    per_key = log_sizes[:, None, :].expand(B, heads, T).reshape(*lead, 1, T)
    mask = None
    if padded:  # the last 5 keys of the second image are padding
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[1, -5:] = False
        mask = valid[:, None, :].expand(B, heads, T).reshape(*lead, 1, T)
    bias = per_key if mask is None else per_key.masked_fill(~mask, float("-inf"))
    for scale in (None, 0.3):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        got = form(q, k, v, log_sizes, attn_mask=mask, scale=scale)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    scores = torch.randn(*lead, T, T, dtype=torch.float64)
    torch.testing.assert_close(add_log_sizes(scores, log_sizes), scores + per_key)


@pytest.mark.parametrize("form", [proportional_sdpa, folded_sdpa])
def test_both_forms_run_the_flash_kernel(form):
    q, k, v = (torch.randn(1, 6, 300, 64) for _ in range(3))
    log_sizes = torch.rand(1, 300).log1p()
    with torch.profiler.profile() as prof:
        form(q, k, v, log_sizes)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names


def test_token_sizes_count_original_patches():
    torch.manual_seed(0)
    total = torch.randint(0, 7, (3, 40))
    valid = torch.ones(3, 9, dtype=torch.bool)
    sizes = log_token_sizes(total, valid, prefix=2).exp().round()
    for b in range(3):
        assert sizes[b, :2].tolist() == [1, 1]
        for m in range(9):
            assert sizes[b, 2 + m] == max(1, int((total[b] == m).sum()))
