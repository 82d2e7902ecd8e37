"""Forest merging: the r most similar nearest-neighbour edges, merged along the trees they form.
A merge method of mpm_fx (the contract of ``mpm_fx.methods``), found by measurement on the real
DINOv2-S/14 (docs/benchmarks.md): at ToMe's token counts it keeps more fidelity than ToMe.

MPM pairs tokens that are each other's nearest neighbour, and only those: every mutual pair
merges, however far apart, and a token merges with one other at most. ToMe lets a token absorb
several, but only across a fixed split into two alternating sets. Forest merging keeps what
each does well and drops both limits. One merge of ``r`` image tokens:

1. **Edges.** Every image token points to its nearest neighbour by cosine of the metric (the
   attention keys averaged over heads, as ToMe, where it merges between attention and MLP): N
   edges, a mutual pair counted once. Nearest-neighbour edges form a forest: following them
   from any token ends in a mutual pair, never in a longer cycle.
2. **Choice.** The r most similar edges are kept.
3. **Groups.** The trees the kept edges form are the merged tokens: a token may absorb several
   (ToMe's many-to-one), chains included, and any two tokens may meet (no fixed sets). A forest
   with r edges over N tokens has exactly N - r trees: ``M = N - r`` for every image.
4. **Means.** Each merged token is its group's mean weighted by size (patches each token stands
   for), as ToMe; proportional attention (the pass's size-aware attention) is on by default.

Merged tokens come out in the raster order of their trees' roots (the token each tree's edges
lead to). **mpm_fx**, where a rule is needed:

- nearest neighbours and edges are ranked by scores rounded to ``mpm_fx.ops.QUANTUM``, ties going
  to the smallest index (a token's neighbour: the first j at its best score; the choice: by
  score, then by the pair's smaller index, then its larger): one strict order of token pairs on
  every machine, and the similarity is made exactly symmetric, so that the nearest-neighbour
  graph has no cycle longer than a mutual pair (its trees are trees);
- a token whose metric is not all finite is never a neighbour; a token with no neighbour gets
  the edge to the token before it (token 0: to token 1), ranked below every real edge, so it
  merges only when r needs more edges than the finite tokens offer, and r <= N // 2 can always
  be met (every tree has two tokens or more);
- a group of one token is copied exactly; half-precision means are summed in float32.

Shapes: B batch, P prefix tokens, N image tokens in, M = N - r out, D channels, E metric
channels, T similarity tile side.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mpm_fx.methods.mpm import STRIP
from mpm_fx.ops.groups import average_groups, check_count, result
from mpm_fx.ops.similarity import QUANTUM, concrete, quantize, ranges, unit_rows
from mpm_fx.ops.tokens import MergeResult

__all__ = ["merge", "nearest", "TILE", "SUMMARY", "COUNTED", "PLACEMENT", "SIZE_AWARE", "OPTIONS",
           "check_options"]

SUMMARY = "the r most similar nearest-neighbour edges, merged as trees"
COUNTED = True  # takes r, the image tokens each merge removes
PLACEMENT = "after_attention"
SIZE_AWARE = True  # proportional attention (its best measured setting)
OPTIONS = {"weighted": True}  # size-weighted means

TILE = 1024  # similarity tiles of (B, T, T): memory stays bounded whatever N
_NEG = float("-inf")
_NO_EDGE = -(1 << 14) - 1  # the score of a fallback edge: below every real one (>= -2**14)


def check_options(options: dict) -> dict:
    """Forest merging's own options (``OPTIONS``), checked."""
    if not isinstance(options["weighted"], bool):
        raise ValueError(f"option weighted of 'forest' must be a bool, got {options['weighted']!r}")
    return options


def merge(x: Tensor, valid: Tensor | None = None, *, prefix: int = 0, sizes: Tensor | None = None,
          metric: Tensor | None = None, r: int, weighted: bool = True) -> MergeResult:
    """One forest merge of ``r`` image tokens of ``x`` (B, P + N, D); see the module docstring.

    metric:   (B, P + N, E) what similarity is computed on (default: x itself);
    sizes:    (B, N) patches per image token (default: 1 each);
    weighted: means weighted by sizes; False: plain means of the current tokens.
    """
    check_count("forest", x, valid, prefix, sizes, metric, r)
    B, N = x.shape[0], x.shape[1] - prefix
    index = torch.arange(N, device=x.device).expand(B, N)
    if r == 0:
        return result(x.clone(), index.clone(), N)
    u, pairable = unit_rows((x if metric is None else metric)[:, prefix:])
    partner, score = nearest(u, pairable)  # step 1
    has_edge = score > _NO_EDGE
    partner = torch.where(has_edge, partner, torch.where(index == 0, 1, index - 1))
    score = torch.where(has_edge, score, _NO_EDGE)
    mutual = partner.gather(1, partner) == index
    owner = ~(mutual & (index > partner))  # a mutual pair's edge belongs to its smaller index
    low, high = torch.minimum(index, partner), torch.maximum(index, partner)
    pairs = N * N
    rank = score * pairs + (pairs - 1 - (low * N + high))  # one strict order of edges
    rank = torch.where(owner, rank, torch.iinfo(torch.int64).min)
    kept = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter(
        1, rank.topk(r, dim=-1).indices, True)  # step 2
    parent = torch.where(kept, partner, index)
    root = _roots(parent)  # step 3
    slot = (parent == index).long().cumsum(1) - 1  # trees in the raster order of their roots
    group = slot.gather(1, root)
    tokens = average_groups(x, prefix, group, N - r, sizes if weighted else None)  # step 4
    return result(tokens, group, N - r)


def _roots(parent: Tensor) -> Tensor:
    """The root of every token's tree (parent pointers, roots point to themselves), by pointer
    jumping: after k rounds each token points 2**k steps up, and no tree is deeper than N - 1."""
    for _ in range(max(1, (parent.shape[1] - 1).bit_length())):
        parent = parent.gather(1, parent)
    return parent


def nearest(u: Tensor, pairable: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's nearest neighbour under the strict order of scores rounded to QUANTUM: the
    smallest j != i with the highest rounded cosine, and that score (int64; -2**40 for a row
    with no pairable other token, whose neighbour is then 0).

    u: (B, N, E) unit rows (0 for rows that are not pairable); pairable: (B, N).
    Each pair's similarity is computed once, in the upper part (j > i): row i reads S[i, j]
    along its row for j > i and down its column for j < i, so both tokens of a pair see the same
    number (two GEMM roundings of one pair could otherwise disagree and close a longer cycle of
    neighbours). Up to TILE tokens, strips of STRIP rows against the columns from the strip's
    first row on, kept between the passes (half the products of N x N, and column reductions
    over a strip at a time); beyond it TILE x TILE upper blocks recomputed in the second pass
    so that memory stays bounded. Two passes: the best score of
    each row, then its first j at or above the rounded best (``_threshold``).
    """
    B, N, _ = u.shape
    every = concrete(u) and bool(pairable.all())  # eager: then no row needs a bias
    bias = None if every else torch.where(pairable, 0.0, _NEG).to(u.dtype)
    tiles = ranges(N, TILE)
    if len(tiles) == 1:  # strips of STRIP rows against the columns from the strip's first row on
        blocks = [((lo, hi), (lo, N)) for lo, hi in ranges(N, STRIP)]
    else:  # TILE x TILE upper blocks, recomputed in the second pass
        blocks = [(rows, cols) for k, rows in enumerate(tiles) for cols in tiles[k:]]
    kept = {}

    def upper(rows, cols):  # (B, rows, cols): S[i, j] for j > i, -inf elsewhere and for unpaired
        if (rows, cols) in kept:
            return kept[rows, cols]
        (r0, r1), (c0, c1) = rows, cols
        s = torch.bmm(u[:, r0:r1], u[:, c0:c1].transpose(1, 2))
        if bias is not None:
            s = s + bias[:, None, c0:c1] + bias[:, r0:r1, None]
        if c0 == r0:  # the block's own rows among its columns: j <= i is not upper
            lower = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=u.device).tril()
            s = s.masked_fill(lower, _NEG)
        if len(tiles) == 1:
            kept[rows, cols] = s  # N x N / 2 + N x STRIP / 2 elements in all
        return s

    best = torch.full((B, N), _NEG, dtype=u.dtype, device=u.device)
    for rows, cols in blocks:
        s = upper(rows, cols)
        (r0, r1), (c0, c1) = rows, cols
        best[:, r0:r1] = torch.maximum(best[:, r0:r1], s.amax(-1))  # j > i
        best[:, c0:c1] = torch.maximum(best[:, c0:c1], s.amax(-2))  # j < i (-inf for j <= r1)
    threshold = _threshold(quantize(best), u.dtype)
    first = torch.full((B, N), N, dtype=torch.long, device=u.device)
    for rows, cols in blocks:
        s = upper(rows, cols)
        (r0, r1), (c0, c1) = rows, cols
        j = _first_at_or_above(s, threshold[:, r0:r1, None], -1) + c0  # along rows: j > i
        first[:, r0:r1] = torch.minimum(first[:, r0:r1], j)
        i = _first_at_or_above(s, threshold[:, None, c0:c1], -2) + r0  # down columns: j < i
        first[:, c0:c1] = torch.minimum(first[:, c0:c1], i)
    first = torch.where(first < N, first, 0)
    return first, quantize(best)


def _first_at_or_above(s: Tensor, threshold: Tensor, dim: int) -> Tensor:
    """The first index along ``dim`` where s >= threshold; a large number (2**40) if none.
    Eager: an argmax of the hits (the first maximum); traced: a minimum of indices, the one
    reduction Inductor vectorises on CPU (its argmax loops are scalar)."""
    hit = s >= threshold
    if concrete(s):
        at = hit.view(torch.uint8).argmax(dim, keepdim=True)
        return torch.where(hit.gather(dim, at), at, 1 << 40).squeeze(dim)
    n = s.shape[dim]
    position = torch.arange(n, device=s.device, dtype=s.dtype)  # exact below 2**24 tokens
    position = position if dim in (-1, s.dim() - 1) else position.unsqueeze(-1)
    return torch.where(hit, position, float(1 << 40)).amin(dim).long()


def _threshold(q: Tensor, dtype: torch.dtype) -> Tensor:
    """The smallest float s of ``dtype`` with ``quantize(s) >= q``, per entry (q int64): where a
    row's scores reach its best rounded score. ``quantize`` is monotone, so ``s >= threshold``
    is exactly ``quantize(s) >= q``. The boundary (q - 1/2) QUANTUM is exact in floats; the sum
    in ``quantize`` rounds, which can move the threshold down by an ulp: two steps are checked.
    Rows without a partner (q = -2**40) get -inf."""
    t = ((q.to(torch.float64) - 0.5) * QUANTUM).to(dtype)
    for _ in range(2):
        below = torch.nextafter(t, torch.full_like(t, _NEG))
        t = torch.where(quantize(below) >= q, below, t)
    return torch.where(q > -(1 << 40), t, _NEG)
