"""The MPM op against the brute-force reference of SPEC.md (tests/reference.py)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import mpm_fx
from mpm_fx import ops
from mpm_fx.methods import mpm

from conftest import examples
from reference import has_near_tie, merge_one

NON_FINITE = [math.nan, math.inf, -math.inf]


@st.composite
def token_batches(draw, max_b=3, max_n=32, max_d=8, min_n=0):
    """(x float64 (B, N, D), valid (B, N) bool or None) with integer coordinates.

    Tokens are drawn from a small pool, so exact duplicates (ties that must break to the
    smallest j), zero vectors and one-token pools are common; some tokens hold NaN/Inf; masks
    are absent, tail padding (what an earlier merge makes) or arbitrary.
    """
    B, N = draw(st.integers(1, max_b)), draw(st.integers(min_n, max_n))
    D = draw(st.integers(1, max_d))
    span = draw(st.sampled_from([1, 3, 50]))
    vector = st.lists(st.integers(-span, span), min_size=D, max_size=D)
    pool = draw(st.lists(vector, min_size=1, max_size=max(1, N)))
    rows = [list(map(float, pool[draw(st.integers(0, len(pool) - 1))])) for _ in range(B * N)]
    for row in rows:
        if draw(st.integers(0, 15)) == 0:  # ~6 % of tokens not finite
            row[draw(st.integers(0, D - 1))] = draw(st.sampled_from(NON_FINITE))
    x = torch.tensor(rows, dtype=torch.float64).reshape(B, N, D)
    kind = draw(st.sampled_from(["none", "tail", "any"]))
    if kind == "none":
        return x, None
    if kind == "tail":
        counts = [draw(st.integers(0, N)) for _ in range(B)]
        valid = torch.arange(N).expand(B, N) < torch.tensor(counts)[:, None]
    else:
        flags = draw(st.lists(st.booleans(), min_size=B * N, max_size=B * N))
        valid = torch.tensor(flags, dtype=torch.bool).reshape(B, N)
    return x, valid


def reference(x: torch.Tensor, valid: torch.Tensor | None, tolerance: float = 0.0):
    B, N, _ = x.shape
    masks = [None if valid is None else valid[b].tolist() for b in range(B)]
    return [merge_one(x[b].tolist(), masks[b], tolerance) for b in range(B)]


def tolerance(x: torch.Tensor) -> float:
    """The op's tie window for x: its similarity dtype (float32 for half inputs) and width."""
    return ops.tie_tolerance(torch.promote_types(x.dtype, torch.float32), x.shape[-1])


def near_tie(x: torch.Tensor, valid: torch.Tensor | None, *, low: float, high: float) -> bool:
    """Some image has a row whose similarities are neither exactly tied nor clearly apart."""
    return any(has_near_tie(x[b].tolist(), None if valid is None else valid[b].tolist(),
                            low=low, high=high) for b in range(x.shape[0]))


def rounding_decides(x: torch.Tensor, valid: torch.Tensor | None) -> bool:
    """A gap close to the tie window's edge (within 4x): there the last bits of the arithmetic
    decide the partner, and no implementation can be held to one answer."""
    return near_tie(x, valid, low=tolerance(x) / 4, high=tolerance(x) * 4)


def _batch(rows, dtype=torch.float64):
    return torch.tensor([rows], dtype=dtype), None


NAN = math.nan
# Found by hypothesis 6.170 (random seeds) and on AMD EPYC (MKL) against the argmax-of-bmm op:
# identical tokens whose similarities the GEMM rounds differently by their place in the tile.
PINNED = [
    _batch([[NAN, 1, 1, 1, 1]] * 10 + [[1, 1, 1, 1, 1]] * 10),
    _batch([[-1.0, k, -k * k, 0.0, 0.0] for k in range(10)] + [[1, 1, 1, 1, 1]] * 10),
    _batch([[0, 0, 0, 0, 1]] * 12 + [[NAN, 2, 2, 3, 3]] + [[0, 0, 0, 0, 1]] * 7),
]


def assert_same(a: torch.Tensor, b: torch.Tensor):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _pin(test):
    for case in PINNED:
        test = example(case)(test)
    return test


@settings(max_examples=examples(2000))
@given(token_batches())
@_pin
def test_matches_reference(case):
    """Maps and tokens bit-identical to the Python-loop reference (same tie window), padded
    batch layout. Exact ties, parallel tokens (b and 3b) included."""
    x, valid = case
    assume(not rounding_decides(x, valid))
    refs = reference(x, valid, tolerance(x))
    r = mpm_fx.merge(x, valid)
    B, N, D = x.shape
    M = max(max(len(t) for t, _, _ in refs), 1) if N else 0  # at least one (padding) row
    assert r.tokens.shape == (B, M if N else 0, D) and r.tokens.dtype == x.dtype
    assert r.merge_map.shape == (B, N) and r.merge_map.dtype == torch.long
    for b, (tokens, merge_map, _) in enumerate(refs):
        if N == 0:
            continue
        m = len(tokens)
        assert r.merge_map[b].tolist() == merge_map
        assert r.valid[b].tolist() == [True] * m + [False] * (M - m)
        if m:
            assert_same(r.tokens[b, :m], torch.tensor(tokens, dtype=x.dtype))
        assert not r.tokens[b, m:].any()  # padding rows are zeros


@contextlib.contextmanager
def layout(strip: int, chunk: int, tile: int, eager: bool, keep: int | None = None):
    """The op with small strips, chunks and tiles, on its eager (kept strips) or traced (two-pass
    blocks) path, so that hypothesis' small inputs cross every strip, chunk and tile edge; with
    ``keep=0`` the tiles of the two passes are computed again, not kept."""
    saved = mpm.STRIP, mpm.CHUNK, mpm.TILE, mpm.KEEP, mpm.concrete
    mpm.STRIP, mpm.CHUNK, mpm.TILE = strip, chunk, tile
    mpm.KEEP = mpm.KEEP if keep is None else keep
    if not eager:
        mpm.concrete = lambda x: False
    try:
        yield
    finally:
        mpm.STRIP, mpm.CHUNK, mpm.TILE, mpm.KEEP, mpm.concrete = saved


LAYOUTS = [(4, 2, 1024, True), (8, 4, 1024, True), (6, 3, 1024, True), (8, 8, 1024, True),
           (4, 2, 1024, False), (8, 4, 1024, False), (4, 2, 5, False), (4, 2, 5, True),
           (8, 4, 11, True), (4, 2, 5, False, 0), (8, 4, 11, True, 0)]


@settings(max_examples=examples(1000))
@given(token_batches(max_n=40), st.sampled_from(LAYOUTS))
@example(case=PINNED[0], strips=LAYOUTS[0])
def test_every_layout_matches_reference(case, strips):
    """Each row reads its earlier columns from other strips' column views, searched chunk by
    chunk (eager) or in two passes (traced, or more than TILE tokens): the maps equal the
    reference whatever the strip, chunk and tile sizes, padding to a chunk included."""
    x, valid = case
    assume(not rounding_decides(x, valid))
    refs = reference(x, valid, tolerance(x))
    with layout(*strips):
        r = mpm_fx.merge(x, valid)
    for b, (_, merge_map, _) in enumerate(refs):
        assert r.merge_map[b].tolist() == merge_map, strips


@settings(max_examples=examples(300))
@given(token_batches())
def test_laws(case):
    """Bounds, group sizes, raster order, reconstruction and composition laws."""
    x, valid = case
    B, N, D = x.shape
    assume(N > 0)
    r = mpm_fx.merge(x, valid)
    v = torch.ones(B, N, dtype=torch.bool) if valid is None else valid
    for b in range(B):
        n, m = int(v[b].sum()), int(r.valid[b].sum())
        assert math.ceil(n / 2) <= m <= n
        mapped = r.merge_map[b][v[b]]
        sizes = torch.bincount(mapped, minlength=m)
        assert mapped.numel() == 0 or (mapped.max() < m and sizes.min() >= 1 and sizes.max() <= 2)
        first = [int(v[b].nonzero()[mapped == k][0]) for k in range(m)]
        assert first == sorted(first)  # output tokens keep their leaders' raster order
    full = mpm_fx.reconstruct(r.tokens, r.merge_map)
    single = torch.bincount((r.merge_map + torch.arange(B)[:, None] * (N + 1))[v],
                            minlength=B * (N + 1)).reshape(B, N + 1).gather(1, r.merge_map) == 1
    keep = v & single  # a singleton comes back exactly (NaN included)
    assert_same(full[keep], x[keep])
    # a second merge: reconstructing twice equals one gather through the composed map
    r2 = mpm_fx.merge(r.tokens, r.valid)
    total = mpm_fx.compose(r.merge_map, r2.merge_map)
    assert_same(mpm_fx.reconstruct(r2.tokens, total)[v],
                mpm_fx.reconstruct(mpm_fx.reconstruct(r2.tokens, r2.merge_map), r.merge_map)[v])
    r3 = mpm_fx.merge(r2.tokens, r2.valid)
    assert torch.equal(mpm_fx.compose(mpm_fx.compose(r.merge_map, r2.merge_map), r3.merge_map),
                       mpm_fx.compose(r.merge_map, mpm_fx.compose(r2.merge_map, r3.merge_map)))


@settings(max_examples=examples(300))
@given(token_batches(max_b=4), st.integers(0, 2))
@example(case=(torch.cat([PINNED[0][0], PINNED[2][0]]), None), prefix=1)
def test_batch_equals_each_image_alone(case, prefix):
    """SPEC step 8: a padded batch gives each image exactly what a batch of one gives, NaN and
    Inf tokens included (the GEMM sees other shapes and tile places in the two runs)."""
    x, valid = case
    B, N, D = x.shape
    if valid is None:
        valid = torch.ones(B, N, dtype=torch.bool)
    assume(not rounding_decides(x, valid))
    head = torch.arange(B * prefix * D, dtype=x.dtype).reshape(B, prefix, D)
    r = mpm_fx.merge(torch.cat([head, x], 1), valid, prefix=prefix)
    for b in range(B):
        keep = valid[b].nonzero().squeeze(1)
        alone = mpm_fx.merge(torch.cat([head[b:b + 1], x[b:b + 1, keep]], 1), prefix=prefix)
        m = alone.tokens.shape[1]
        assert_same(r.tokens[b, :m], alone.tokens[0])
        assert r.merge_map[b, keep].tolist() == alone.merge_map[0].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@settings(max_examples=examples(150))
@given(case=token_batches())
@_pin
def test_low_precision_matches_float64_path(dtype, case):
    """The guarantee for float32/bfloat16/float16 inputs (similarity in float32): on values exact
    in the dtype, the maps equal the float64 path's wherever every similarity is either exactly
    tied with its row's maximum or more than twice the float32 tie window below it. Closer
    than that, float32 counts as a tie what float64 resolves (see test_tie_window). The dtype
    is kept and pair means round once."""
    x, valid = case
    window = ops.tie_tolerance(torch.float32, x.shape[-1])
    assume(not near_tie(x, valid, low=0, high=2 * window))
    low = x.to(dtype)  # integers up to 50: exact in every dtype here
    r, r64 = mpm_fx.merge(low, valid), mpm_fx.merge(x, valid)
    assert r.tokens.dtype == dtype
    assert torch.equal(r.merge_map, r64.merge_map) and torch.equal(r.valid, r64.valid)
    assert_same(r.tokens, r64.tokens.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tie_window(dtype):
    """SPEC step 3 as mpm_fx reads it: the smallest j within tie_tolerance of the row maximum.
    Token 0 looks at tokens 1 and 2; token 2 is the nearer by a gap of g."""
    window = ops.tie_tolerance(dtype, 2)
    for gap, partner in ((window / 10, 1), (window * 10, 2)):
        c1 = 0.6  # cos(x0, x1); x2 at cos 0.6 + gap
        a1, a2 = math.acos(c1), math.acos(c1 + gap)
        x = torch.tensor([[[1.0, 0.0], [math.cos(a1), math.sin(a1)], [math.cos(a2), -math.sin(a2)]]],
                         dtype=torch.float64).to(dtype)
        got = mpm.nearest_neighbours(x, torch.ones(1, 3, dtype=torch.bool))
        assert got[0, 0] == partner, (gap, got)


def test_same_partner_wherever_the_gemm_puts_a_duplicate():
    """Identical tokens after other rows: the GEMM rounds their similarities by tile place
    (seen on AMD EPYC / MKL: 1.0 and 0.99999999999999989). Every duplicate must pair with the
    smallest j, at every offset, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        for before in (0, 1, 7, 10, 33):
            g = torch.Generator().manual_seed(before)
            x = torch.cat([torch.randn(1, before, 5, generator=g, dtype=torch.float64),
                           torch.ones(1, 10, 5, dtype=torch.float64)], 1).to(dtype)
            partner = mpm.nearest_neighbours(x, torch.ones(1, before + 10, dtype=torch.bool))[0]
            dup = partner[before:].tolist()
            assert dup == [before + 1] + [before] * 9, (dtype, before, dup)


def test_tiled_equals_one_tile(monkeypatch):
    """Cutting the similarity into tiles changes no result, duplicates across tiles included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 16, generator=g)
    x[:, 200:260] = x[:, 10:70]  # exact duplicates that land in other tiles
    x[1, 5] = float("nan")
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, 290:] = False
    whole = mpm_fx.merge(x, valid)
    for tile in (1, 7, 64, 299):
        for keep in (mpm.KEEP, 0):  # the tiles kept for the second pass, or computed again
            monkeypatch.setattr(mpm, "TILE", tile)
            monkeypatch.setattr(mpm, "KEEP", keep)
            tiled = mpm_fx.merge(x, valid)
            assert torch.equal(tiled.merge_map, whole.merge_map)
            assert_same(tiled.tokens, whole.tokens)


def test_tiles_are_kept_up_to_keep_and_computed_again_past_it(monkeypatch):
    """The two-pass search holds its tiles between passes while they fit in KEEP elements (the
    upper half of the similarity, and more), and past it no more than a few tiles at once."""
    from mpm_fx.costs import peak_tensor_bytes

    monkeypatch.setattr(mpm, "TILE", 128)
    x = torch.randn(1, 1000, 8)
    upper = 1000 * 1000 // 2  # elements of the similarity's upper half
    peak = {}
    for keep in (2 * upper, upper // 2):
        monkeypatch.setattr(mpm, "KEEP", keep)
        peak[keep], _ = peak_tensor_bytes(lambda: mpm_fx.merge(x))
    assert peak[2 * upper] >= 4 * upper  # float32: every upper tile alive at once
    assert peak[upper // 2] < 4 * upper // 4


def test_similarity_never_materialised_whole(monkeypatch):
    """No tensor of N x N elements (or more) is created while merging N > TILE tokens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    monkeypatch.setattr(mpm, "TILE", 128)
    x = torch.randn(1, 1000, 8)
    with Largest():
        mpm_fx.merge(x)
    assert 128 * 128 <= Largest.numel < 1000 * 1000 // 4


def test_edge_sizes():
    for B in (0, 1, 3):
        empty = mpm_fx.merge(torch.randn(B, 0, 4))
        assert empty.tokens.shape == (B, 0, 4) and empty.merge_map.shape == (B, 0)
        one = torch.randn(B, 1, 4)
        r = mpm_fx.merge(one)
        assert torch.equal(r.tokens, one) and not r.merge_map.any() and r.valid.all()
    with_prefix = torch.randn(2, 3, 4)  # prefix only: nothing to merge, prefix kept
    assert torch.equal(mpm_fx.merge(with_prefix, prefix=3).tokens, with_prefix)


def test_prefix_tokens_pass_through():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2 + 50, 8, generator=g)
    x[:, 0] = x[:, 2]  # a prefix token identical to an image token must not pair with it
    r = mpm_fx.merge(x, prefix=2)
    assert torch.equal(r.tokens[:, :2], x[:, :2])
    assert torch.equal(r.merge_map, mpm_fx.merge(x[:, 2:]).merge_map)
    full = mpm_fx.reconstruct(r.tokens, r.merge_map, prefix=2)
    assert full.shape == x.shape and torch.equal(full[:, :2], x[:, :2])


@pytest.mark.parametrize("call, message", [
    (lambda: mpm_fx.merge(torch.randn(4, 8)), r"shape \(B, N, D\).*2-D"),
    (lambda: mpm_fx.merge(torch.randn(1, 2, 4, 8)), r"shape \(B, N, D\).*4-D"),
    (lambda: mpm_fx.merge(torch.ones(1, 4, 8, dtype=torch.long)), r"floating point.*int64.*float\(\)"),
    (lambda: mpm_fx.merge([[1.0]]), r"torch.Tensor"),
    (lambda: mpm_fx.merge(torch.randn(2, 4, 8), torch.ones(2, 5, dtype=torch.bool)), r"valid must have shape"),
    (lambda: mpm_fx.merge(torch.randn(2, 4, 8), torch.ones(2, 3, dtype=torch.bool), prefix=2),
     r"\(2, 2\).*prefix excluded"),
    (lambda: mpm_fx.merge(torch.randn(2, 4, 8), torch.ones(2, 4)), r"valid must be a bool tensor"),
    (lambda: mpm_fx.merge(torch.randn(2, 4, 8), prefix=5), r"prefix must be an int in \[0, 4\]"),
    (lambda: mpm_fx.merge(torch.randn(2, 4, 8), prefix=1.0), r"prefix must be an int"),
    (lambda: mpm_fx.compose(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)),
     r"batch sizes differ"),
    (lambda: mpm_fx.compose(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long)), r"int64"),
    (lambda: mpm_fx.reconstruct(torch.randn(2, 4, 8), torch.zeros(3, 4, dtype=torch.long)),
     r"batch sizes differ"),
    (lambda: mpm_fx.reconstruct(torch.randn(2, 4, 8), torch.zeros(2, 4, 1, dtype=torch.long)),
     r"merge_map must be a \(B, N\) int64"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_gradient_reaches_every_token_of_its_group():
    """With autograd on, merging works and d(sum of tokens)/dx is 1 / (size of the token's
    group): 1/2 for a pair, 1 for a singleton and the prefix."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1 + 40, 8, generator=g, dtype=torch.float64)
    x[:, 21:] = x[:, 1:21] + 1e-3  # near duplicates: pairs
    x.requires_grad_()
    r = mpm_fx.merge(x, prefix=1)
    r.tokens.sum().backward()
    sizes = torch.zeros(2, r.tokens.shape[1] - 1, dtype=torch.float64).scatter_add_(
        1, r.merge_map, torch.ones(2, 40, dtype=torch.float64))
    want = torch.cat([torch.ones(2, 1), 1 / sizes.gather(1, r.merge_map)], 1)
    assert (sizes == 2).any()
    torch.testing.assert_close(x.grad, want[..., None].expand_as(x), rtol=0, atol=0)


def test_inputs_are_not_modified():
    x = torch.randn(2, 40, 8)
    x[0, 3] = float("inf")
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    before, valid_before = x.clone(), valid.clone()
    mpm_fx.merge(x, valid)
    assert_same(x, before) and torch.equal(valid, valid_before)


@pytest.mark.parametrize("batch, dim", [(1, 384), pytest.param(2, 1024, marks=pytest.mark.slow)])
def test_peak_memory_at_16k_tokens(batch, dim):
    """N = 16,384 (a 2048-px image at patch 16): at most 64 MiB per image, output included,
    where the whole float32 similarity alone would take 1 GiB per image."""
    from mpm_fx.costs import peak_tensor_bytes

    x = torch.randn(batch, 16384, dim, generator=torch.Generator().manual_seed(0))
    peak, r = peak_tensor_bytes(lambda: mpm_fx.merge(x))
    assert r.tokens.shape[1] < 16384
    assert peak <= batch * 64 * 2**20, f"peak {peak / 2**20:.1f} MiB"
