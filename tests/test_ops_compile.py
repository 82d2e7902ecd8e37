"""The op under torch.compile: one graph, no recompiles, same results as eager."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import mpm_fx

pytestmark = pytest.mark.compile


def two_merges(x, valid=None):
    """merge -> merge -> one gather through the composed map, like the pass will insert."""
    r1 = mpm_fx.merge(x, valid, prefix=1)
    r2 = mpm_fx.merge(r1.tokens * 1.5, r1.valid, prefix=1)
    total = mpm_fx.compose(r1.merge_map, r2.merge_map)
    return mpm_fx.reconstruct(r2.tokens, total, prefix=1), r2.tokens, r2.valid, total


def inputs(seed, batch):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1 + 256, 32, generator=g)
    k = 40 * seed  # duplicates of the first k image tokens: more merging as seed grows
    x[:, 129:129 + k] = x[:, 1:1 + k]
    return x


@pytest.mark.parametrize("batch", [1, 3])
def test_one_inductor_graph_for_every_token_count(batch):
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(two_merges, backend=counter, fullgraph=True)
    counts = set()
    for seed in range(4):
        x = inputs(seed, batch)
        got, expect = compiled(x), two_merges(x)
        counts.add(expect[1].shape[1])
        torch.testing.assert_close(got[0], expect[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(got[2], expect[2])
        # the same pairs as eager, although the duplicates tie exactly and the compiled code
        # normalises and reduces in its own order (the tie window absorbs the last bits)
        assert torch.equal(got[3], expect[3])
    assert len(counts) == 4, f"inputs should give different token counts, got {counts}"
    assert counter.frame_count == 1  # one graph, never recompiled


def test_exports_with_unbacked_token_counts():
    """torch.export (non-strict) captures two merges once; the exported program follows every
    image's own token count."""

    class TwoMerges(torch.nn.Module):
        def forward(self, x):
            return two_merges(x)[0]

    model = TwoMerges()
    program = torch.export.export(model, (inputs(0, 1),), strict=False)
    for seed in range(1, 4):
        x = inputs(seed, 1)
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)


def test_forest_alternate_strips_compiled_as_eager(monkeypatch):
    """Forest with edges="alternate" over several strips (each made to wait for the one before
    it, so Inductor cannot fuse them) gives under Inductor the groups eager gives: rows of +-1
    (norm 4), whose cosines are exact in any summation order, full of exact ties."""
    from mpm_fx.methods import forest

    monkeypatch.setattr(forest, "STRIP", 16)  # 64 A rows: 4 strips
    monkeypatch.setattr(forest, "SEQUENCED", 0)  # each after the one before it
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 2, (2, 1 + 128, 16), generator=g).float() * 2 - 1

    def merge(x):
        out = forest.merge(x, prefix=1, r=50, edges="alternate")
        return out.tokens, out.merge_map

    expect = merge(x)
    got = torch.compile(merge, backend="inductor", fullgraph=True)(x)
    assert torch.equal(got[1], expect[1])
    torch.testing.assert_close(got[0], expect[0], rtol=1e-6, atol=1e-6)
