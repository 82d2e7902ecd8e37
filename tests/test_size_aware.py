"""Size-aware attention: the folded q/k channel equals an explicit log(size) bias, keeps the
flash kernel, and the pass matches an eager reference that adds the bias by hand."""

import types

import pytest
import torch
import torch.nn.functional as F

import mpm_fx
from mpm_fx.models import segmenter
from mpm_fx.models.photos import photos
from mpm_fx.size_aware import add_log_sizes, log_token_sizes, proportional_sdpa


@pytest.mark.parametrize("shape", [(2, 3, 37, 64), (6, 37, 30)])  # (B, H, T, E) and (B*H, T, E)
@pytest.mark.parametrize("padded", [False, True])
def test_folded_channel_equals_explicit_bias(shape, padded):
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
        got = proportional_sdpa(q, k, v, log_sizes, attn_mask=mask, scale=scale)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    scores = torch.randn(*lead, T, T, dtype=torch.float64)
    torch.testing.assert_close(add_log_sizes(scores, log_sizes), scores + per_key)


def test_folded_attention_runs_the_flash_kernel_without_a_mask():
    q, k, v = (torch.randn(1, 6, 300, 64) for _ in range(3))
    log_sizes = torch.rand(1, 300).log1p()
    with torch.profiler.profile() as prof:
        proportional_sdpa(q, k, v, log_sizes)
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


class _Reference:
    """Eager size-aware MPM on our Segmenter, by hooks and a hand-written attention."""

    def __init__(self, model, schedule):
        self.model, self.schedule = model, schedule

    def __call__(self, x):
        return torch.cat([self._one(x[i:i + 1]) for i in range(len(x))])

    def _one(self, x):
        enc = self.model.encoder
        state = {"map": None, "log_sizes": None}

        def merge_before(module, args):
            r = mpm_fx.merge(args[0], prefix=1)
            state["map"] = r.merge_map if state["map"] is None else mpm_fx.compose(
                state["map"], r.merge_map)
            counts = torch.bincount(state["map"][0], minlength=r.valid.shape[1]).double()
            state["log_sizes"] = torch.cat([counts.new_ones(1), counts]).log()[None]
            return (r.tokens,)

        def attention(attn, x):  # softmax(q k^T * scale + log size_j) v
            B, N, C = x.shape
            q, k, v = attn.qkv(x).reshape(B, N, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
            logits = (q @ k.transpose(-2, -1)) * attn.scale
            if state["log_sizes"] is not None:
                logits = logits + state["log_sizes"][:, None, None, :]
            return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))

        def rebuild(module, args):
            return (mpm_fx.reconstruct(args[0], state["map"], prefix=1),)

        hooks = [enc.blocks[k].register_forward_pre_hook(merge_before) for k in self.schedule]
        hooks.append(enc.norm.register_forward_pre_hook(rebuild))
        originals = {b.attn: b.attn.forward for b in enc.blocks}
        for block in enc.blocks:
            block.attn.forward = types.MethodType(attention, block.attn)
        try:
            with torch.no_grad():
                return self.model(x)
        finally:
            for h in hooks:
                h.remove()
            for attn, forward in originals.items():
                attn.forward = forward


@pytest.mark.parametrize("attention", ["sdpa", "softmax"])
def test_pass_matches_size_aware_reference_at_batch_1_and_3(attention):
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="linear", n_cls=5, image_size=128, n_layers=6,
                                attention=attention).double().eval()
    x = photos(("astronaut", "coffee", "chelsea"), 128, dtype=torch.float64)
    schedule = (1, 3)
    expected = _Reference(model, schedule)(x)
    aware = mpm_fx.optimize(model, schedule, size_aware=True)
    plain = mpm_fx.optimize(model, schedule)
    with torch.no_grad():
        single, batch = aware(x[:1]), aware(x)
        report = aware.mpm_report()
        unaware = plain(x)
    torch.testing.assert_close(single, expected[:1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(batch, expected, rtol=1e-9, atol=1e-9)
    assert report.size_aware == 6 - schedule[0]
    assert not torch.allclose(batch, unaware, atol=1e-6)  # the option changes the result
