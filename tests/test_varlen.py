"""attention="varlen": a padded batch's attentions without a mask, each image on its own keys
(mpm_fx.ops.varlen; on CUDA the varlen FlashAttention kernel, here the per-image form), held to the
masked path and to each image alone at batch 1..8, with size-aware attention, gathered position
tables and every entry point."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mpm_fx
from mpm_fx import ops
from mpm_fx.ops.varlen import varlen_sdpa

from conftest import examples
from families import FACTORIES
from fixtures import photos


@st.composite
def padded_attention(draw):
    """q, k, v (B, H, P + M, E) float64, valid (B, M) True first, an optional float bias."""
    B, H, P, M, E = (draw(st.integers(1, 8)), draw(st.integers(1, 3)), draw(st.integers(0, 2)),
                     draw(st.integers(1, 9)), draw(st.sampled_from([4, 8])))
    counts = [draw(st.integers(1, M)) for _ in range(B)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    q, k, v = (torch.randn(B, H, P + M, E, generator=g, dtype=torch.float64) for _ in range(3))
    valid = torch.arange(M)[None, :] < torch.tensor(counts)[:, None]
    bias = (torch.randn(draw(st.sampled_from([1, B])), H, P + M, P + M, generator=g,
                        dtype=torch.float64) if draw(st.booleans()) else None)
    return q, k, v, valid, P, bias


@settings(max_examples=examples(100))
@given(padded_attention())
def test_equals_the_masked_path_and_each_image_alone(case):
    q, k, v, valid, P, bias = case
    out = varlen_sdpa(q, k, v, bias, valid=valid, prefix=P)
    mask = ops.key_mask(valid, k, prefix=P) if bias is None else ops.mask_keys(bias, valid,
                                                                               prefix=P)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=1e-12, atol=1e-12)
    for b in range(len(q)):
        n = P + int(valid[b].sum())
        own = None if bias is None else bias[min(b, len(bias) - 1):][:1, :, :n, :n]
        alone = F.scaled_dot_product_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n],
                                               v[b:b + 1, :, :n], attn_mask=own)
        torch.testing.assert_close(out[b:b + 1, :, :n], alone, rtol=1e-12, atol=1e-12)


def _varlen_attn_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, seqused_k=None):
    """What torch's varlen_attn computes, as a loop: sequence i is rows cu[i]:cu[i + 1]
    (T, H, E), its first seqused_k[i] keys when given."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
    for i in range(len(cu_q) - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        if seqused_k is not None:
            d = c + int(seqused_k[i])
        out[a:b] = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1),
            scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("key_counts", [True, False])
@settings(max_examples=examples(30))
@given(case=padded_attention())
def test_cuda_path_packs_the_images_as_the_kernel_expects(key_counts, case):
    """The CUDA kernel's layout work (padded layout with seqused_k, or packed rows with
    cumulative lengths on torch 2.11), run here against a loop of what varlen_attn computes:
    every valid row equals the masked path."""
    import torch.nn.attention.varlen as torch_varlen

    from mpm_fx.ops import varlen

    q, k, v, valid, P, _ = case
    lengths = valid.sum(1) + P
    scale = q.shape[-1] ** -0.5
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_varlen, "varlen_attn", _varlen_attn_reference)
        patch.setattr(varlen, "_takes_key_counts", lambda: key_counts)
        out = varlen._cuda_kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), lengths, None, scale)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=ops.key_mask(valid, k, prefix=P))
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b, :, :n].double(), expected[b, :, :n], rtol=0.05,
                                   atol=0.05)
        if not key_counts:
            assert not out[b, :, n:].any()  # packed: padded rows left 0


def test_falls_back_to_the_mask_where_the_per_image_op_does_not_apply():
    q = k = v = torch.randn(6, 5, 4, dtype=torch.float64)  # (B * H, L, E): no head dim
    valid = torch.tensor([[True] * 4, [True, True, False, False]] * 3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=ops.key_mask(valid, k, prefix=1))
    torch.testing.assert_close(varlen_sdpa(q, k, v, valid=valid, prefix=1), expected)


@pytest.mark.parametrize("name", ["timm_rope_reg1", "timm_beit_relative_bias", "timm_vit_tiny"])
@pytest.mark.parametrize("size_aware", [False, True])
def test_model_batches_equal_the_masked_path_and_each_image_alone(name, size_aware):
    """Whole models at batch 3: rotary tables and relative-position biases gathered by leaders,
    proportional attention folded into q/k, both with per-image attention."""
    family = FACTORIES[name]()
    x = photos(("astronaut", "coffee", "chelsea"), family.size, dtype=torch.float64)
    varlen = mpm_fx.optimize(family.model, (2, 5), attention="varlen", size_aware=size_aware)
    masked = mpm_fx.optimize(family.model, (2, 5), attention="masked", size_aware=size_aware)
    with torch.no_grad():
        out = varlen(x)
        assert varlen.mpm_report().stats["varlen_attentions"] > 0
        assert masked(x[:1]) is not None and masked(x) is not None
        assert "varlen_attentions" not in masked.mpm_report().stats
        torch.testing.assert_close(out, masked(x), rtol=1e-9, atol=1e-9)
        for i in range(len(x)):
            torch.testing.assert_close(out[i:i + 1], varlen(x[i:i + 1]), rtol=1e-9, atol=1e-9)


def test_auto_is_masked_off_cuda_and_the_option_is_checked():
    family = FACTORIES["timm_vit_tiny"]()
    x = photos(("astronaut", "coffee"), family.size, dtype=torch.float64)
    optimized = mpm_fx.optimize(family.model, (2, 5))  # attention="auto"
    with torch.no_grad():
        optimized(x)
    assert "varlen_attentions" not in optimized.mpm_report().stats
    with pytest.raises(ValueError, match="attention must be one of auto, masked, varlen"):
        mpm_fx.optimize(family.model, (2, 5), attention="flash")


def test_aot_and_tensorrt_refuse_varlen_with_the_fix(tmp_path):
    from mpm_fx.backends.tensorrt import mpm_tensorrt

    family = FACTORIES["timm_vit_tiny"]()
    x = photos(("astronaut", "coffee"), family.size, dtype=torch.float64)
    with pytest.raises(ValueError, match="attention='masked'"):
        mpm_fx.aot_compile(family.model, x, tmp_path / "m.pt2", attention="varlen")
    with pytest.raises(ValueError, match="attention='masked'"):
        mpm_tensorrt(None, [x], {"attention": "varlen"}, compile_segment=lambda *a: None)
