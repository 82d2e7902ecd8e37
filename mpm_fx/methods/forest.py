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
   from any token ends in a mutual pair, never in a longer cycle. With ``edges="alternate"``
   the neighbour is searched only among the tokens of the other parity in the current order
   (ToMe's sets: A = tokens 0, 2, 4, ..., B = 1, 3, 5, ...), in both directions: A tokens
   point into B and B tokens into A. That similarity is ToMe's, (N/2) x (N/2), a quarter of
   N x N where "all" computes half; the edges still form a forest (a nearest-neighbour graph
   of any graph with one strict order of edge weights has no longer cycle).
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
- a token whose metric is not all finite is never a neighbour; a token with no neighbour (none
  finite, or none in the other set with ``edges="alternate"``) gets
  the edge to the token before it (token 0: to token 1), ranked below every real edge, so it
  merges only when r needs more edges than the finite tokens offer, and r <= N // 2 can always
  be met (every tree has two tokens or more);
- a group of one token is copied exactly; half-precision means are summed in float32.

Shapes: B batch, P prefix tokens, N image tokens in, M = N - r out, D channels, E metric
channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mpm_fx.ops.groups import merge_counted
from mpm_fx.ops.similarity import QUANTUM, ranges
from mpm_fx.ops.tokens import MergeResult

__all__ = ["merge", "nearest", "nearest_across", "check_options", "EDGES", "STRIP", "SUMMARY",
           "COUNTED", "PLACEMENT", "SIZE_AWARE", "OPTIONS"]

SUMMARY = "the r most similar nearest-neighbour edges, merged as trees"
COUNTED = True  # takes r, the image tokens each merge removes
PLACEMENT = "after_attention"
SIZE_AWARE = True  # proportional attention (its best measured setting)
# weighted: size-weighted means; edges: where a token's nearest neighbour is searched, "all"
# the other tokens or "alternate" those of the other parity (ToMe's sets, a quarter the cost)
OPTIONS = {"weighted": True, "edges": "all"}
EDGES = ("all", "alternate")


def check_options(options: dict) -> dict:
    """Forest's own options, checked: ``weighted`` a bool, ``edges`` one of ``EDGES``."""
    if not isinstance(options["weighted"], bool):
        raise ValueError(f"option weighted of 'forest' must be a bool, got "
                         f"{options['weighted']!r}")
    if options["edges"] not in EDGES:
        raise ValueError(f"option edges of 'forest' must be one of {', '.join(map(repr, EDGES))} "
                         f"(where a token's nearest neighbour is searched), got "
                         f"{options['edges']!r}")
    return options

STRIP = 256  # rows of the similarity computed and read at a time
# nearest_across's strips are all one shape, and Inductor fuses their reductions into one
# kernel that reads every strip after every GEMM: cheaper while the whole similarity stays in
# the cache, far dearer past it (one merge on real tokens at 8,192, Inductor, AMD EPYC: 60 ms
# fused against 28 ms one strip at a time). Above SEQUENCED entries each strip's rows get a
# + 0 that reads the strip before it, so each strip is reduced right after its own GEMM.
SEQUENCED = 1 << 22
_NONE = -(1 << 14) - 1  # the rounded score of a pair that is not a candidate (below -1)
_NO_EDGE = -(1 << 14) - 1  # the score of a fallback edge: below every real one (>= -2**14)


def merge(x: Tensor, valid: Tensor | None = None, *, prefix: int = 0, sizes: Tensor | None = None,
          metric: Tensor | None = None, r: int, weighted: bool = True,
          edges: str = "all") -> MergeResult:
    """Forest merging of ``r`` image tokens of ``x`` (B, P + N, D): the steps of the module
    docstring, with ``mpm_fx.methods``' arguments (``weighted=False``: plain means; ``edges``:
    where neighbours are searched, ``EDGES``)."""
    if edges not in EDGES:
        raise ValueError(f"edges must be one of {', '.join(map(repr, EDGES))}, got {edges!r}")
    return merge_counted("forest", _GROUPS[edges], x, valid, prefix, sizes, metric, r, weighted)


def _groups(u: Tensor, pairable: Tensor, r: int, search=None) -> Tensor:
    """Steps 1-3: the group of every image token, (B, N) in [0, N - r): its tree, numbered in
    the raster order of the trees' roots. ``search``: step 1's neighbours (``nearest``)."""
    B, N = pairable.shape
    index = torch.arange(N, device=u.device).expand(B, N)
    partner, score = (search or nearest)(u, pairable)  # step 1
    has_edge = score > _NO_EDGE
    partner = torch.where(has_edge, partner, torch.where(index == 0, 1, index - 1))
    score = torch.where(has_edge, score, _NO_EDGE)
    mutual = partner.gather(1, partner) == index
    owner = ~(mutual & (index > partner))  # a mutual pair's edge belongs to its smaller index
    low, high = torch.minimum(index, partner), torch.maximum(index, partner)
    pairs = N * N
    rank = score * pairs + (pairs - 1 - (low * N + high))  # one strict order of edges
    rank = torch.where(owner, rank, torch.iinfo(torch.int64).min)
    kept = torch.zeros(B, N, dtype=torch.bool, device=u.device).scatter(
        1, rank.topk(r, dim=-1).indices, True)  # step 2
    parent = torch.where(kept, partner, index)
    root = _roots(parent)  # step 3
    slot = (parent == index).long().cumsum(1) - 1  # trees in the raster order of their roots
    return slot.gather(1, root)


def _alternate_groups(u: Tensor, pairable: Tensor, r: int) -> Tensor:
    return _groups(u, pairable, r, nearest_across)


_GROUPS = {"all": _groups, "alternate": _alternate_groups}


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
    neighbours). The upper part is computed in strips of STRIP rows against the columns from
    the strip's first row on (half the products of N x N; a strip of 256 rows stays in the
    cache), each read once: every score is rounded and packed with its index into one integer
    key, ``rounded score * K + (K - 1 - index)`` (K a power of two > N), whose maximum along the
    row (j > i) and down the column (i < j) is the best score with its smallest index. Under
    Inductor each strip is one bmm and one vectorised loop; memory: one strip, O(N) besides.
    """
    B, N, _ = u.shape
    K, kind = _key_space(N)
    index = torch.arange(N, device=u.device)
    column_best = torch.full((B, N), torch.iinfo(kind).min, dtype=kind, device=u.device)
    row_best = []
    for lo, hi in ranges(N, STRIP):
        s = torch.bmm(u[:, lo:hi], u[:, lo:].transpose(1, 2))  # (B, hi - lo, N - lo)
        i, j = index[lo:hi, None], index[None, lo:]
        upper = (j > i) & pairable[:, lo:hi, None] & pairable[:, None, lo:]
        score = torch.where(upper, torch.floor(s / QUANTUM + 0.5), _NONE).to(kind)
        row_best.append((score * K + (K - 1 - j).to(kind)).amax(-1))  # j > i
        below = (score * K + (K - 1 - i).to(kind)).amax(-2)  # the rows i < j of column j
        column_best = torch.cat([column_best[:, :lo], torch.maximum(column_best[:, lo:], below)],
                                1)
    key = torch.maximum(torch.cat(row_best, 1), column_best).long()
    return _unpack(key, K)


def nearest_across(u: Tensor, pairable: Tensor, sets: tuple | None = None) -> tuple[Tensor, Tensor]:
    """``nearest`` with neighbours in the other set only: ``sets`` = (A, B), two index tensors
    that split 0..N-1 (default: the even and the odd tokens), A token's neighbour among B and
    B token's among A, by the same strict order (rounded score, then the smallest index). One
    similarity of the A rows against the B rows, (N/2) x (N/2) in strips of STRIP rows, each
    entry read for its row (an A token's best B one) and its column (a B token's best A one),
    so both tokens of a pair see the same number."""
    B, N, _ = u.shape
    K, kind = _key_space(N)
    if sets is None:
        sets = torch.arange(0, N, 2, device=u.device), torch.arange(1, N, 2, device=u.device)
    a_index, b_index = sets
    a, b = u[:, a_index], u[:, b_index]
    a_ok, b_ok = pairable[:, a_index], pairable[:, b_index]
    lowest = torch.iinfo(kind).min
    b_best = torch.full((B, b.shape[1]), lowest, dtype=kind, device=u.device)
    a_best = []
    one_at_a_time = a.shape[1] * b.shape[1] > SEQUENCED
    for lo, hi in ranges(a.shape[1], STRIP):
        rows = a[:, lo:hi]
        if lo and one_at_a_time:
            rows = rows + (b_best[:, :1, None] < lowest).to(rows.dtype)  # + 0, after the last
        s = torch.bmm(rows, b.transpose(1, 2))  # (B, hi - lo, Nb)
        ok = a_ok[:, lo:hi, None] & b_ok[:, None, :]
        score = torch.where(ok, torch.floor(s / QUANTUM + 0.5), _NONE).to(kind)
        a_best.append((score * K + (K - 1 - b_index).to(kind)).amax(-1))
        i = a_index[lo:hi, None].to(kind)
        b_best = torch.maximum(b_best, (score * K + (K - 1 - i)).amax(-2))
    key = torch.full((B, N), lowest, dtype=kind, device=u.device)
    key = key.index_copy(1, a_index, torch.cat(a_best, 1)).index_copy(1, b_index, b_best).long()
    return _unpack(key, K)


def _key_space(n: int) -> tuple:
    """K, a power of two > n (index slots of a key), and the integer type that holds every
    ``rounded score * K + slot`` (int32 up to n = 65,536)."""
    K = 1 << max(1, (n - 1).bit_length())
    return K, torch.int32 if _NONE * K >= torch.iinfo(torch.int32).min else torch.int64


def _unpack(key: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """(partner, score) of packed int64 keys; a key below every real score: (0, -2**40)."""
    score = torch.div(key, K, rounding_mode="floor")
    partner = K - 1 - (key - score * K)
    none = score <= _NONE
    return torch.where(none, 0, partner), torch.where(none, -(1 << 40), score)
