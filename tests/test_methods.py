"""The merge methods of mpm_fx.methods against brute-force loops written from their papers and
docstrings (tests/reference.py), and the contract every method keeps."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mpm_fx
from mpm_fx import ops
from mpm_fx.methods import forest, label, merging, policy, tome

from conftest import examples
from reference import (
    cosine,
    forest_one,
    mpm_weighted_one,
    rounding_distance,
    tome_one,
)
from test_ops import assert_same, rounding_decides, token_batches, tolerance

COUNTED = {"tome": (tome, tome_one), "forest": (forest, forest_one),
           "forest-alternate": (SimpleNamespace(merge=partial(forest.merge, edges="alternate")),
                                partial(forest_one, edges="alternate"))}


@st.composite
def counted_cases(draw, max_n=24):
    """(x (B, P + N, D) float64 with integer coordinates, prefix P, sizes (B, N) or None, r)."""
    x, _ = draw(token_batches(max_n=max_n))
    B, N, D = x.shape
    prefix = draw(st.integers(0, 2))
    head = torch.arange(B * prefix * D, dtype=x.dtype).reshape(B, prefix, D)
    sizes = None
    if draw(st.booleans()):
        sizes = torch.tensor(draw(st.lists(st.integers(1, 5), min_size=B * N, max_size=B * N)),
                             dtype=torch.float32).reshape(B, N)
    r = draw(st.integers(0, N // 2))
    return torch.cat([head, x], 1), prefix, sizes, r


def rounding_close(x: torch.Tensor, margin: float = 1e-6) -> bool:
    """Some pair of finite tokens has a cosine within ``margin`` quanta of a rounding boundary:
    there the last bits of the arithmetic decide its rounded score."""
    for image in x:
        rows = [t for t in image.tolist() if all(math.isfinite(c) for c in t)]
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                if rounding_distance(cosine(rows[i], rows[j])) < margin:
                    return True
    return False


def _reference(name, x, prefix, sizes, r, weighted=True):
    B, N = x.shape[0], x.shape[1] - prefix
    one = COUNTED[name][1]
    return [one(x[b, prefix:].tolist(), [1.0] * N if sizes is None else sizes[b].tolist(), r,
                weighted) for b in range(B)]


@pytest.mark.parametrize("name", sorted(COUNTED))
@settings(max_examples=examples(300))
@given(case=counted_cases(), weighted=st.booleans())
def test_counted_methods_match_reference(name, case, weighted):
    """Maps equal the loop's, tokens its (size-weighted) group means, the prefix untouched,
    M = N - r for every image, no padding. Exact ties (duplicate tokens), zero vectors and
    non-finite tokens included."""
    x, prefix, sizes, r = case
    assume(not rounding_close(x[:, prefix:]))
    B, T, D = x.shape
    N = T - prefix
    out = COUNTED[name][0].merge(x, prefix=prefix, sizes=sizes, r=r, weighted=weighted)
    assert out.tokens.shape == (B, prefix + N - r, D) and out.tokens.dtype == x.dtype
    assert out.valid.shape == (B, N - r) and out.valid.all()
    assert_same(out.tokens[:, :prefix], x[:, :prefix])
    for b, (tokens, merge_map) in enumerate(_reference(name, x, prefix, sizes, r, weighted)):
        assert out.merge_map[b].tolist() == merge_map
        want = torch.tensor(tokens, dtype=x.dtype).reshape(N - r, D)
        torch.testing.assert_close(out.tokens[b, prefix:], want, rtol=1e-12, atol=1e-12,
                                   equal_nan=True)


@pytest.mark.parametrize("name", sorted(COUNTED))
@settings(max_examples=examples(150))
@given(case=counted_cases(max_n=32))
def test_counted_methods_batch_equals_each_image_alone(name, case):
    """Every image of a batch gets what it gets alone (the GEMM sees other shapes and places)."""
    x, prefix, sizes, r = case
    out = COUNTED[name][0].merge(x, prefix=prefix, sizes=sizes, r=r)
    for b in range(x.shape[0]):
        alone = COUNTED[name][0].merge(x[b:b + 1], prefix=prefix,
                                       sizes=None if sizes is None else sizes[b:b + 1], r=r)
        assert torch.equal(out.merge_map[b], alone.merge_map[0])
        assert_same(out.tokens[b], alone.tokens[0])


@pytest.mark.parametrize("name", sorted(COUNTED))
@settings(max_examples=examples(150))
@given(case=counted_cases(max_n=32))
def test_laws(name, case):
    """Every slot holds a group; sizes add up; a group of one comes back exactly; a second merge
    composes; reconstruction through the composed map equals two gathers."""
    x, prefix, sizes, r = case
    B, N = x.shape[0], x.shape[1] - prefix
    op = COUNTED[name][0].merge
    first = op(x, prefix=prefix, sizes=sizes, r=r)
    M = N - r
    for b in range(B):
        assert sorted(set(first.merge_map[b].tolist())) == list(range(M))
    size_in = torch.ones(B, N) if sizes is None else sizes
    size_out = torch.zeros(B, M).scatter_add(1, first.merge_map, size_in)
    assert torch.equal(size_out.sum(1), size_in.sum(1))
    members = torch.zeros(B, M).scatter_add(1, first.merge_map, torch.ones(B, N))
    alone = members.gather(1, first.merge_map) == 1
    full = ops.reconstruct(first.tokens, first.merge_map, prefix=prefix)
    assert_same(full[:, prefix:][alone], x[:, prefix:][alone])
    second = op(first.tokens, prefix=prefix, sizes=size_out, r=M // 3)
    total = ops.compose(first.merge_map, second.merge_map)
    assert_same(ops.reconstruct(second.tokens, total, prefix=prefix),
                ops.reconstruct(ops.reconstruct(second.tokens, second.merge_map, prefix=prefix),
                                first.merge_map, prefix=prefix))
    assert torch.equal(ops.token_sizes(total, second.valid).sum(1), torch.full((B,), float(N)))


@pytest.mark.parametrize("name", sorted(COUNTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@settings(max_examples=examples(60))
@given(case=counted_cases())
def test_low_precision_gives_the_float64_maps(name, dtype, case):
    """Scores are computed in float32 and rounded to quanta: on values exact in the dtype, the
    maps equal the float64 path's wherever no cosine is within 0.01 quanta of a rounding
    boundary. The dtype is kept; means are summed in float32 and rounded once."""
    x, prefix, sizes, r = case
    assume(not rounding_close(x[:, prefix:], margin=0.01))
    op = COUNTED[name][0].merge
    low, high = op(x.to(dtype), prefix=prefix, sizes=sizes, r=r), op(x, prefix=prefix,
                                                                      sizes=sizes, r=r)
    assert low.tokens.dtype == dtype
    assert torch.equal(low.merge_map, high.merge_map)
    torch.testing.assert_close(low.tokens, high.tokens.to(dtype), equal_nan=True)


@pytest.mark.parametrize("edges", forest.EDGES)
@settings(max_examples=examples(150))
@given(case=counted_cases(max_n=40), strip=st.sampled_from([1, 2, 3, 7, 16, 256]),
       sequenced=st.sampled_from([0, forest.SEQUENCED]))
def test_forest_strips_change_nothing(edges, case, strip, sequenced):
    """The similarity in strips of any height, each pair computed once (and with "alternate"
    each strip made to wait for the one before it, or not), gives what one strip gives."""
    x, prefix, sizes, r = case
    whole = forest.merge(x, prefix=prefix, sizes=sizes, r=r, edges=edges)
    saved = forest.STRIP, forest.SEQUENCED
    forest.STRIP, forest.SEQUENCED = strip, sequenced
    try:
        tiled = forest.merge(x, prefix=prefix, sizes=sizes, r=r, edges=edges)
    finally:
        forest.STRIP, forest.SEQUENCED = saved
    assert torch.equal(tiled.merge_map, whole.merge_map)
    assert_same(tiled.tokens, whole.tokens)


@pytest.mark.parametrize("edges", forest.EDGES)
def test_forest_groups_are_trees_of_nearest_neighbours(edges):
    """Each forest group is connected by nearest-neighbour edges, and r removes exactly r
    tokens, on random data full of near ties (rounded scores tie often at D = 3)."""
    g = torch.Generator().manual_seed(0)
    search = {"all": forest.nearest, "alternate": forest.nearest_across}[edges]
    for trial in range(20):
        x = torch.randn(1, 300, 3, generator=g)
        r = int(torch.randint(0, 151, (1,), generator=g))
        out = forest.merge(x, r=r, edges=edges)
        assert out.tokens.shape[1] == 300 - r
        partner = search(*ops.unit_rows(x))[0][0].tolist()
        for m in range(300 - r):
            members = set((out.merge_map[0] == m).nonzero().flatten().tolist())
            linked, frontier = set(), [min(members)]
            while frontier:
                i = frontier.pop()
                if i in linked:
                    continue
                linked.add(i)
                frontier += [j for j in members if partner[j] == i or partner[i] == j]
            assert linked == members, (trial, m, sorted(members))


def test_tome_is_bipartite():
    """A ToMe group holds one B token (odd index) and only A tokens (even) besides."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 101, 8, generator=g)
    out = tome.merge(x, r=50)
    for b in range(2):
        for m in range(51):
            members = (out.merge_map[b] == m).nonzero().flatten().tolist()
            assert sum(i % 2 for i in members) <= 1


@settings(max_examples=examples(200))
@given(token_batches(max_b=1))
def test_size_weighted_mpm_matches_reference(case):
    """MPM with ``weighted=True``: the SPEC's pairs, each pair's mean weighted by sizes."""
    x, _ = case
    N = x.shape[1]
    assume(N > 0 and not rounding_decides(x, None))
    sizes = torch.arange(N, dtype=torch.float32).remainder(4) + 1
    out = mpm_fx.merge(x, sizes=sizes[None], weighted=True)
    tokens, merge_map = mpm_weighted_one(x[0].tolist(), sizes.tolist(), tolerance(x))
    assert out.merge_map[0].tolist() == merge_map
    torch.testing.assert_close(out.tokens[0], torch.tensor(tokens, dtype=x.dtype).reshape(
        len(tokens), -1), rtol=1e-12, atol=1e-12, equal_nan=True)
    plain = mpm_fx.merge(x)
    assert torch.equal(plain.merge_map, out.merge_map)  # sizes weigh the means, not the pairs


def test_mpm_with_a_metric_pairs_by_the_metric():
    """MPM pairs by the metric's similarity and averages x."""
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]], dtype=torch.float64)
    assert mpm_fx.merge(x).merge_map[0].tolist() == [0, 0, 1, 1]
    twisted = torch.tensor([[[1.0, 0], [0, 1.0], [0.1, 0.9], [0.9, 0.1]]], dtype=torch.float64)
    out = mpm_fx.merge(x, metric=twisted)
    assert out.merge_map[0].tolist() == [0, 1, 1, 0]  # pairs (0, 3) and (1, 2)
    torch.testing.assert_close(out.tokens[0], torch.stack([(x[0, 0] + x[0, 3]) / 2,
                                                           (x[0, 1] + x[0, 2]) / 2]))


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_gradient_reaches_every_token_of_its_group(name):
    """d(sum of merged tokens)/dx = the token's share of its group's weight."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1 + 40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    sizes = torch.randint(1, 4, (2, 40), generator=g).double()
    out = COUNTED[name][0].merge(x, prefix=1, sizes=sizes, r=15)
    out.tokens.sum().backward()
    weight = torch.zeros(2, 25, dtype=torch.float64).scatter_add(1, out.merge_map, sizes)
    want = torch.cat([torch.ones(2, 1, dtype=torch.float64),
                      sizes / weight.gather(1, out.merge_map)], 1)
    torch.testing.assert_close(x.grad, want[..., None].expand_as(x))


@pytest.mark.parametrize("call, message", [
    (lambda: tome.merge(torch.randn(1, 10, 4), r=6), r"r=6 is out of range for 10 .*0\.\.5"),
    (lambda: forest.merge(torch.randn(1, 10, 4), r=-1), r"r=-1 is out of range"),
    (lambda: forest.merge(torch.randn(1, 10, 4), r=2.0), r"r must be an int"),
    (lambda: forest.merge(torch.randn(1, 10, 4), r=2, edges="odd"), r"edges must be one of"),
    (lambda: tome.merge(torch.randn(1, 10, 4), torch.ones(1, 10, dtype=torch.bool), r=2),
     r"takes no valid mask"),
    (lambda: forest.merge(torch.randn(2, 10, 4), r=2, metric=torch.randn(2, 9, 4)),
     r"metric must have the batch and tokens of x"),
    (lambda: forest.merge(torch.randn(2, 10, 4), r=2, sizes=torch.ones(2, 9)),
     r"sizes must have shape \(B, N\) = \(2, 10\)"),
    (lambda: mpm_fx.merge(torch.randn(2, 10, 4), sizes=torch.ones(2, 10, dtype=torch.long)),
     r"sizes must be a floating-point"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="mpm", r=3), r"r is an option of the methods that merge a fixed count"),
    (dict(method="tome"), r"needs r"),
    (dict(method="forest", r=-2), r"r must be >= 0"),
    (dict(method="forest", r=True), r"r must be an int"),
    (dict(method="forest", r="12"), r"r must be an int or a sequence"),
    (dict(method="tome", r=(10,), schedule=(2, 5)), r"r has 1 entries but the schedule"),
    (dict(method="mine"), r"unknown merge method 'mine': choose from mpm, tome, forest"),
    (dict(method="tome", r=3, beta=1), r"unknown option\(s\) beta for method 'tome'"),
    (dict(method="tome", r=3, placement="inside"), r"placement must be one of"),
    (dict(method="tome", r=3, weighted=1), r"option weighted of 'tome' must be a bool"),
    (dict(method="forest", r=3, weighted=1), r"option weighted of 'forest' must be a bool"),
    (dict(method="forest", r=3, edges="bipartite"),
     r"option edges of 'forest' must be one of 'all', 'alternate'"),
    (dict(method="tome", r=3, placement="before_block", metric="queries"),
     r"metric must be one of tokens, keys"),
    (dict(method="tome", r=3, metric="tokens"),
     r"always reads the attention's keys: drop metric, or merge before the block"),
])
def test_bad_method_options_are_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        merging(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, method, options", [
    ("forest", "forest", {}),
    (" forest:edges=alternate ", "forest", {"edges": "alternate"}),
    ("local:window=5:weighted=false:grid=None:passes=2", "local",
     {"window": 5, "weighted": False, "grid": None, "passes": 2}),
    ("tome:placement=before_block:size_aware=true", "tome",
     {"placement": "before_block", "size_aware": True}),
    ("tome:placement=before_block:metric=keys", "tome",
     {"placement": "before_block", "metric": "keys"}),
])
def test_a_policy_reads_a_method_and_its_options_as_merging_takes_them(text, method, options):
    assert policy(text) == (method, options)
    assert policy(label(method, options)) == (method, options)  # label is its inverse
    resolved = merging(method, r=3 if method != "local" else None, **options)
    for name, value in options.items():
        assert resolved.own_options.get(name, getattr(resolved, name, None)) == value


@pytest.mark.parametrize("text, message", [
    ("fores", r"unknown merge method 'fores' in 'fores'"),
    ("forest:edges", r"'edges' in 'forest:edges' is not an option: write method:name=value"),
    ("forest:=alternate", r"is not an option"),
    ("forest:edges=all:edges=alternate", r"option 'edges' is given twice .*: keep one"),
])
def test_a_bad_policy_is_a_one_line_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        policy(text)


def test_every_method_is_listed_with_its_defaults():
    assert mpm_fx.METHODS == ("mpm", "tome", "forest", "local")
    assert merging() == merging("mpm")  # the default is the SPEC: no size weights, no bias
    plain = merging("mpm")
    assert not plain.size_aware and plain.placement == "before_block" and not plain.uses_sizes
    for name in ("tome", "forest"):
        m = merging(name, r=4)
        assert m.size_aware and m.placement == "after_attention" and m.uses_sizes
        assert not m.pads and m.kwargs(0)["r"] == 4


def test_the_metric_follows_the_placement_unless_given():
    """None: the placement's own metric (the tokens before the block, the keys after the
    attention); "keys" before the block is named where a report says what ran."""
    assert merging("mpm").metric == "tokens" and merging("tome", r=3).metric == "keys"
    keys = merging("tome", r=3, placement="before_block", metric="keys")
    assert keys.metric == "keys" and "metric=keys" in keys.describe()
    assert "metric" not in merging("tome", r=3).describe()
    assert "metric" in mpm_fx.methods.option_names("mpm")
