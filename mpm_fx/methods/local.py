"""Local MPM: mutual pairs as docs/SPEC.md defines them, with partners searched only among each
token's spatial neighbours, so that a merge costs time linear in the tokens (a merge method of
mpm_fx, the contract of ``mpm_fx.methods``; semantics in docs/SPEC.md, "Local MPM").

The MPM paper names the global N x N similarity as its limit at high resolution, and observes
that most mutual pairs are spatially adjacent. Here the candidates of a token are the tokens
that hold an original patch within ``window // 2`` rows and columns of one of its own patches
(a square window of side ``window`` around every patch of its group). The groups come from the
composed merge map of the earlier merges (``total_map``), never from Python state, so the
positions follow the merges under a compiler and in a ``.pt2``. One merge:

1. **Candidate pairs.** For every original patch p and every offset o of half the window
   (the other half is the same pairs reversed), the pair (group(p), group(p + o)) when
   p + o lies in the grid and the two groups differ: at most ``N0 (window^2 - 1) / 2`` pairs,
   duplicates included (two groups that touch along several patches).
2. **Similarity.** Cosine of the metric rows of the two tokens (SPEC step 2), computed once per
   patch pair, and the same for every patch pair of the same two tokens: ``S`` is exactly
   symmetric on the candidates. Pairs that are not candidates count as -inf.
3. **Nearest neighbour, mutual pairs, leaders, map, means, padding.** SPEC steps 3-8 on that
   restricted similarity: the smallest candidate j within the tie window of row i's maximum;
   a token with no candidate (or not finite, or padding) pairs with no one.
4. **Further passes** (``passes`` > 1). The nearest-neighbour search and the mutual test
   again, among the tokens no earlier pass paired: the candidate pairs whose two ends are both
   still unpaired, with the same similarities. A token whose nearest neighbour chose another
   token gets its best remaining candidate, so one merge leaves fewer tokens. The pairs of all
   passes then go through the rest of step 3 (leaders, map, means) as one set; every group is
   still at most a pair.

Cost: the pairs are O(N0 window^2) dot products of E channels, and a few scatters into the N
current tokens: linear in the tokens, where global MPM's similarity is N x N. A further pass
costs the scatters again, not the similarities.

Shapes: B batch, P prefix tokens, N0 original image tokens (a grid of rows x cols), N image
tokens in, M out, D channels, E metric channels, K = (window^2 - 1) / 2 offsets.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_true

from mpm_fx.methods.mpm import check_merge, merge_pairs, token_bounds
from mpm_fx.ops.similarity import tie_tolerance, unit_rows
from mpm_fx.ops.tokens import MergeResult

__all__ = ["merge", "candidate_pairs", "nearest", "token_bounds", "SUMMARY", "COUNTED",
           "PLACEMENT", "SIZE_AWARE", "POSITIONS", "OPTIONS", "check_options"]

SUMMARY = "mutual pairs among spatial neighbours (window x window), linear cost"
COUNTED = False  # finds its count per image
PLACEMENT = "before_block"
SIZE_AWARE = False
POSITIONS = True  # reads the composed map and the patch grid (``total_map``, ``patch_grid``)
# window: side of the square around each patch; weighted: size-weighted means (measured at
# 896 px, docs/benchmarks.md); grid: (rows, cols) of the image tokens where the analysis cannot
# find it (None: the grid the pass finds); passes: how often step 3 runs, each time among the
# tokens still unpaired (1: MPM's one pass; 2 leaves about a quarter fewer tokens and loses
# agreement, measured at 896 px in docs/benchmarks.md)
OPTIONS = {"window": 3, "weighted": True, "grid": None, "passes": 1}

_NEG = float("-inf")


def check_options(options: dict) -> dict:
    """Local MPM's own options, checked: ``window`` an odd int >= 3, ``weighted`` a bool,
    ``grid`` None or (rows, cols), ``passes`` an int >= 1."""
    if not isinstance(options["weighted"], bool):
        raise ValueError(f"option weighted of 'local' must be a bool, got {options['weighted']!r}")
    _check_window(options["window"])
    _check_passes(options["passes"])
    return {**options, "grid": None if options["grid"] is None else _check_grid(options["grid"])}


def merge(x: Tensor, valid: Tensor | None = None, *, prefix: int = 0, sizes: Tensor | None = None,
          metric: Tensor | None = None, total_map: Tensor | None = None, patch_grid=None,
          grid=None, window: int = 3, weighted: bool = False, passes: int = 1) -> MergeResult:
    """One local MPM call on ``x`` (B, P + N, D); see the module docstring.

    total_map: (B, N0) the composed map of the earlier merges, from every original image token
               into the N tokens of x (None at the first merge: N = N0, token i is patch i);
    patch_grid: (rows, cols) of the original image tokens, raster order (rows * cols = N0), as
               the pass found it; ``grid``, the option, overrides it;
    window:    side of the square window around each patch, odd, >= 3;
    passes:    how many times the nearest-neighbour search runs, each among the tokens that
               no earlier pass paired (1: the SPEC's one pass);
    valid, sizes, metric, weighted: as ``mpm_fx.methods.mpm.merge``.
    """
    B, N, all_valid = check_merge(x, valid, prefix, sizes, metric)
    _check_window(window)
    _check_passes(passes)
    rows, cols = _check_grid(grid or patch_grid)
    if total_map is None:
        if not guard_or_true(N == rows * cols):
            raise ValueError(f"without a total_map, x must hold the grid's {rows} x {cols} = "
                             f"{rows * cols} image tokens, got {N}")
        total_map = torch.arange(N, device=x.device).expand(B, N)
    elif total_map.dim() != 2 or total_map.shape[0] != B or total_map.shape[1] != rows * cols:
        raise ValueError(f"total_map must be (B, N0) = ({B}, {rows * cols}) (the grid's "
                         f"tokens), got {tuple(total_map.shape)}")
    partner = nearest((x if metric is None else metric)[:, prefix:], all_valid, total_map,
                      (rows, cols), window, passes)
    return merge_pairs(x, valid, prefix, partner, all_valid, sizes if weighted else None)


def _offsets(grid: tuple, window: int) -> list:
    """(dr, dc, c0, c1) of half the window's offsets (the other half: the same pairs reversed):
    the pair of cells (r, c) and (r + dr, c + dc) for r < rows - dr, c0 <= c < c1."""
    rows, cols = grid
    reach, out = window // 2, []
    for dr in range(0, reach + 1):
        for dc in range(-reach, reach + 1):
            if dr == 0 and dc <= 0:
                continue
            c0, c1 = max(0, -dc), cols - max(0, dc)
            if dr < rows and c1 > c0:
                out.append((dr, dc, c0, c1))
    return out


def candidate_pairs(total_map: Tensor, grid: tuple, window: int) -> tuple[Tensor, Tensor]:
    """(a, b): (B, N0 K) token indices of every patch pair within the window (half of the
    offsets: each unordered patch pair once), a = the group of the first patch, b = of the
    second. Pairs of one group (a == b) are kept; the similarity step masks them."""
    rows, cols = grid
    B = total_map.shape[0]
    cells = total_map.reshape(B, rows, cols)
    first, second = [], []
    for dr, dc, c0, c1 in _offsets(grid, window):
        first.append(cells[:, :rows - dr, c0:c1].reshape(B, -1))
        second.append(cells[:, dr:, c0 + dc:c1 + dc].reshape(B, -1))
    if not first:  # a grid of one patch: no pair
        return total_map.new_zeros(B, 0), total_map.new_zeros(B, 0)
    return torch.cat(first, 1), torch.cat(second, 1)


def _pair_similarities(u: Tensor, total_map: Tensor, grid: tuple, window: int) -> Tensor:
    """cos of every candidate pair, in the order of ``candidate_pairs``: the unit rows are laid
    on the patch grid once (each patch holding its token's row) and each offset is one
    dot product of two shifted views, with no gather of pairs."""
    rows, cols = grid
    B, _, E = u.shape
    cells = u.gather(1, total_map.unsqueeze(-1).expand(B, rows * cols, E)).reshape(
        B, rows, cols, E)
    parts = [torch.linalg.vecdot(cells[:, :rows - dr, c0:c1], cells[:, dr:, c0 + dc:c1 + dc]
                                 ).reshape(B, -1) for dr, dc, c0, c1 in _offsets(grid, window)]
    return torch.cat(parts, 1) if parts else u.new_zeros(B, 0)


def nearest(x: Tensor, valid: Tensor, total_map: Tensor, grid: tuple, window: int,
            passes: int = 1) -> Tensor:
    """SPEC step 3 on the window's candidates: b(i) = the smallest candidate j whose cosine is
    within ``tie_tolerance`` of row i's best; b(i) = i where i has no candidate (or is not
    finite, or padding). Each further pass repeats it for the tokens not yet in a mutual pair,
    among candidates that are not either: a paired token keeps its partner, an unpaired one
    takes its new choice (or itself). x: (B, N, E) -> (B, N) int64."""
    B, N, E = x.shape
    u, pairable = unit_rows(x, valid)  # SPEC step 2
    sim_dtype = u.dtype
    a, b = candidate_pairs(total_map, grid, window)
    s = _pair_similarities(u, total_map, grid, window)  # (B, pairs), once per patch pair
    ok = (a != b) & pairable.gather(1, a) & pairable.gather(1, b)
    s = torch.where(ok, s, _NEG)
    ends, others = torch.cat([a, b], 1), torch.cat([b, a], 1)  # each pair read by both tokens
    s = torch.cat([s, s], 1)
    index = torch.arange(N, device=x.device).expand(B, N)
    partner, free, sp = index, pairable, s  # free: not in a mutual pair yet
    for k in range(passes):
        if k:  # the first pass's s already masks every pair with an end that is not pairable
            sp = torch.where(free.gather(1, ends) & free.gather(1, others), s, _NEG)
        best = torch.full((B, N), _NEG, dtype=sim_dtype, device=x.device).scatter_reduce(
            1, ends, sp, "amax")
        threshold = best - tie_tolerance(sim_dtype, E)
        inside = (sp >= threshold.gather(1, ends)) & (sp > _NEG)
        first = torch.full((B, N), N, dtype=torch.long, device=x.device).scatter_reduce(
            1, ends, torch.where(inside, others, N), "amin")
        found = free & (first < N)
        partner = torch.where(found, first, torch.where(free, index, partner))
        mutual = found & (partner.gather(1, partner) == index)
        free = free & ~mutual
    return partner


def _check_grid(grid) -> tuple:
    if grid is None:
        raise ValueError("local MPM needs the grid of the original image tokens: mpm_fx finds it "
                         "where the model flattens its (h, w) patch grid into tokens; where it "
                         "cannot, pass grid=(rows, cols) with method='local'")
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid must be (rows, cols) of the original image tokens, two positive "
                         f"ints, got {grid!r}")
    return tuple(grid)


def _check_passes(passes) -> None:
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be an int >= 1 (how many times local MPM searches "
                         f"partners among the tokens still unpaired), got {passes!r}")


def _check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 3 (the side of the square around each "
                         f"patch), got {window!r}")
