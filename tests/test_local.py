"""Local MPM (mpm_fx/methods/local.py) against the brute-force SPEC loop restricted to the
window's candidates (tests/reference.py), and the properties the issue asks of it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mpm_fx
from mpm_fx.methods import local, merging

from conftest import examples
from reference import group_mean, has_close_pair, merge_one, window_neighbours
from test_ops import assert_same, rounding_decides, token_batches, tolerance


@st.composite
def grids(draw):
    """(x (B, N, D), valid or None, total_map (B, N0), grid, window): N0 patches on a rows x
    cols grid, each mapped onto one of the N tokens (every valid token holds a patch; padding
    tokens hold none), as after earlier merges; or, without a map, N = N0."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    N0 = rows * cols
    window = draw(st.sampled_from([3, 5, 7]))
    if draw(st.booleans()):  # the first merge: token i is patch i
        x, _ = draw(token_batches(min_n=N0, max_n=N0))
        return x, None, None, (rows, cols), window
    x, valid = draw(token_batches(min_n=1, max_n=N0))
    B, N, _ = x.shape
    if valid is None:
        valid = torch.ones(B, N, dtype=torch.bool)
    valid[:, 0] = True  # at least one real token per image to hold patches
    maps = []
    for b in range(B):
        real = valid[b].nonzero().flatten().tolist()
        owners = list(real) + [draw(st.sampled_from(real)) for _ in range(N0 - len(real))]
        owners = owners[:N0] if len(owners) >= N0 else owners
        order = draw(st.permutations(range(N0)))
        maps.append([owners[order[p]] if order[p] < len(owners) else real[0] for p in range(N0)])
    total = torch.tensor(maps, dtype=torch.long)
    held = torch.zeros(B, N, dtype=torch.bool).scatter(1, total, True)
    return x, held & valid, total, (rows, cols), window


def reference(x, valid, total, grid, window, passes=1):
    B, N, _ = x.shape
    out = []
    for b in range(B):
        mapping = list(range(N)) if total is None else total[b].tolist()
        allowed = window_neighbours(mapping, grid, window)
        out.append(merge_one(x[b].tolist(), None if valid is None else valid[b].tolist(),
                             tolerance(x), allowed, passes))
    return out


def rounding_decides_in_some_subset(x, valid) -> bool:
    """Two similarities of a row within 4x of the tie window of each other: a later pass
    searches a subset of the row, where either may be the maximum (``has_close_pair``)."""
    low, high = tolerance(x) / 4, tolerance(x) * 4
    return any(has_close_pair(x[b].tolist(), None if valid is None else valid[b].tolist(),
                              low=low, high=high) for b in range(x.shape[0]))


@settings(max_examples=examples(400))
@given(grids())
def test_matches_reference_restricted_to_the_window(case):
    """Maps and tokens equal the SPEC loop whose candidates are the tokens holding a patch
    within the window of one of the row's patches: tie window, non-finite tokens, padding."""
    x, valid, total, grid, window = case
    assume(not rounding_decides(x, valid))
    r = local.merge(x, valid, total_map=total, grid=grid, window=window)
    for b, (tokens, merge_map, _) in enumerate(reference(x, valid, total, grid, window)):
        m = len(tokens)
        assert r.merge_map[b].tolist() == merge_map
        if m:
            assert_same(r.tokens[b, :m], torch.tensor(tokens, dtype=x.dtype))


@settings(max_examples=examples(300))
@given(grids(), st.integers(2, 3))
def test_further_passes_match_the_reference(case, passes):
    """passes > 1: the SPEC loop run again among the tokens no earlier pass paired (maps and
    tokens), and never more tokens than one pass leaves."""
    x, valid, total, grid, window = case
    assume(not rounding_decides_in_some_subset(x, valid))
    r = local.merge(x, valid, total_map=total, grid=grid, window=window, passes=passes)
    one = local.merge(x, valid, total_map=total, grid=grid, window=window)
    for b, (tokens, merge_map, _) in enumerate(reference(x, valid, total, grid, window,
                                                         passes)):
        m = len(tokens)
        assert r.merge_map[b].tolist() == merge_map
        if m:
            assert_same(r.tokens[b, :m], torch.tensor(tokens, dtype=x.dtype))
        assert m <= int(one.valid[b].sum())


def test_a_second_pass_pairs_the_tokens_whose_partners_were_taken():
    """A row of four: 1 and 2 are each other's nearest; 0's nearest is 1 and 3's is 2, so one
    pass leaves 0 and 3 alone; the second pairs them (each the other's only free candidate)."""
    x = torch.tensor([[[1.0, 0.30], [1.0, 0.02], [1.0, 0.0], [1.0, -0.30]]],
                     dtype=torch.float64)
    one = local.merge(x, grid=(1, 4), window=7)
    two = local.merge(x, grid=(1, 4), window=7, passes=2)
    assert one.merge_map.tolist() == [[0, 1, 1, 2]]
    assert two.merge_map.tolist() == [[0, 1, 1, 0]]
    assert_same(two.tokens[0, 0], (x[0, 0] + x[0, 3]) / 2)
    # window 3: 0 and 3 are not neighbours, so there is nothing left to pair
    assert local.merge(x, grid=(1, 4), window=3, passes=2).merge_map.tolist() == [[0, 1, 1, 2]]


@settings(max_examples=examples(150))
@given(grids())
def test_weighted_means_are_the_means_of_the_patches(case):
    """The method's default (weighted=True): the same pairs as the reference, each pair's mean
    weighted by the patches its tokens hold (sizes from the composed map)."""
    x, valid, total, grid, window = case
    assume(not rounding_decides(x, valid))
    B, N, _ = x.shape
    sizes = (torch.ones(B, N) if total is None else
             torch.zeros(B, N).scatter_add(1, total, torch.ones(total.shape)))
    r = local.merge(x, valid, total_map=total, grid=grid, window=window, sizes=sizes,
                    weighted=True)
    for b, (_, merge_map, _) in enumerate(reference(x, valid, total, grid, window)):
        assert r.merge_map[b].tolist() == merge_map
        ok = [True] * N if valid is None else valid[b].tolist()
        groups = {}
        for i, m in enumerate(merge_map):
            if ok[i]:
                groups.setdefault(m, []).append(i)
        expected = [group_mean(x[b].tolist(), sizes[b].tolist(), groups[m], True)
                    for m in sorted(groups)]
        if expected:
            torch.testing.assert_close(r.tokens[b, :len(expected)],
                                       torch.tensor(expected, dtype=x.dtype),
                                       rtol=1e-5, atol=1e-5, equal_nan=True)


@settings(max_examples=examples(150))
@given(grids())
def test_batch_equals_each_image_alone(case):
    x, valid, total, grid, window = case
    assume(not rounding_decides(x, valid))
    r = local.merge(x, valid, total_map=total, grid=grid, window=window)
    for b in range(x.shape[0]):
        alone = local.merge(x[b:b + 1], None if valid is None else valid[b:b + 1],
                            total_map=None if total is None else total[b:b + 1], grid=grid,
                            window=window)
        assert torch.equal(alone.merge_map[0], r.merge_map[b])
        m = alone.tokens.shape[1]
        assert_same(r.tokens[b, :m], alone.tokens[0])


@settings(max_examples=examples(100))
@given(token_batches(max_n=30))
def test_a_window_over_the_whole_grid_is_global_mpm(case):
    """With every patch inside every window, the candidates are all tokens: the SPEC op."""
    x, valid = case
    N = x.shape[1]
    assume(N > 0 and not rounding_decides(x, valid))
    window = 2 * N + 1
    r = local.merge(x, valid, grid=(1, N), window=window)
    g = mpm_fx.merge(x, valid)
    assert torch.equal(r.merge_map, g.merge_map) and torch.equal(r.valid, g.valid)
    assert_same(r.tokens, g.tokens)


def test_candidates_grow_linearly_and_pairs_stay_local():
    """At most N0 (window^2 - 1) / 2 patch pairs; on a raw grid every pair is within reach."""
    for rows, cols, window in ((4, 4, 3), (16, 32, 3), (16, 32, 5), (64, 128, 3)):
        total = torch.arange(rows * cols)[None]
        a, b = local.candidate_pairs(total, (rows, cols), window)
        assert a.shape[1] <= rows * cols * (window * window - 1) // 2
        reach = window // 2
        assert ((a // cols - b // cols).abs() <= reach).all()
        assert ((a % cols - b % cols).abs() <= reach).all()
    # 4 x 4 grid, window 3: 12 horizontal + 12 vertical + 9 + 9 diagonal pairs
    assert local.candidate_pairs(torch.arange(16)[None], (4, 4), 3)[0].shape[1] == 42


def test_partners_are_spatial_neighbours_on_a_real_layout():
    """Tokens that are identical far apart never pair; identical neighbours do."""
    x = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, 63] = x[0, 0]  # opposite corners of an 8 x 8 grid: identical, far apart
    x[0, 9] = x[0, 0] * 2 + 0.01  # nearly parallel to token 0: its diagonal neighbour
    r = local.merge(x, grid=(8, 8), window=3)
    assert r.merge_map[0, 0] == r.merge_map[0, 9] != r.merge_map[0, 63]
    g = mpm_fx.merge(x)  # the global op pairs 0 with its exact twin 63
    assert g.merge_map[0, 0] == g.merge_map[0, 63] != g.merge_map[0, 9]


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=(3, 3)), r"without a total_map, x must hold the grid's 3 x 3 = 9"),
    (dict(grid=None), r"local MPM needs the grid"),
    (dict(grid=(2, 5), window=4), r"window must be an odd int >= 3"),
    (dict(grid=(2, 5), passes=0), r"passes must be an int >= 1"),
    (dict(grid=(2, 5), total_map=torch.zeros(1, 7, dtype=torch.long)),
     r"total_map must be \(B, N0\) = \(1, 10\)"),
])
def test_bad_input_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        local.merge(torch.randn(1, 10, 4), **kwargs)


def test_options():
    m = merging("local", window=5)
    assert m.uses_positions and m.pads and m.uses_sizes  # size-weighted means by default
    assert m.own_options == {"window": 5, "weighted": True, "grid": None, "passes": 1}
    # the op's arguments: its options, and where the tokens are (the pass's composed map, grid)
    assert m.kwargs(1, total_map="map", patch_grid=(4, 8)) == {
        "window": 5, "weighted": True, "grid": None, "passes": 1, "total_map": "map",
        "patch_grid": (4, 8)}
    assert not merging("local", weighted=False).uses_sizes
    with pytest.raises(ValueError, match="window must be an odd int"):
        merging("local", window=2)
    with pytest.raises(ValueError, match="grid must be"):
        merging("local", grid=(3,))
    assert merging("local", passes=2).kwargs(0)["passes"] == 2
    for bad in (0, -1):
        with pytest.raises(ValueError, match="passes must be an int >= 1"):
            merging("local", passes=bad)
    with pytest.raises(ValueError, match="passes"):  # its default's type: an int, not a bool
        merging("local", passes=True)
