"""Mutual Pair Merging (MPM), the op of docs/SPEC.md, in plain aten ops: the default merge
method of mpm_fx (the contract of ``mpm_fx.methods``).

Each function is one step of the SPEC. It is written as ordinary tensor code (no custom op) so that
the same source runs in eager mode, traces into one ``torch.compile`` graph and survives
``torch.export`` + AOTInductor. Shapes in comments: B batch, P prefix tokens, N image tokens in,
M tokens out, D channels, T similarity tile side.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

from mpm_fx.ops.similarity import concrete, first_true, ranges, row_norms, scale_rows, tie_tolerance
from mpm_fx.ops.tokens import (
    MergeResult,
    check_mask,
    check_metric,
    check_prefix,
    check_sizes,
    check_tokens,
    gather_rows,
    mean_of_two,
    weighted_mean_of_two,
)

__all__ = ["merge", "nearest_neighbours", "pair_up", "average_pairs", "token_bounds",
           "check_merge", "merge_pairs",
           "SUMMARY", "COUNTED", "PLACEMENT", "SIZE_AWARE", "OPTIONS",
           "TILE", "STRIP", "CHUNK", "SLOTS"]

SUMMARY = "mutual nearest-neighbour pairs (MPM, docs/SPEC.md)"
COUNTED = False  # finds its count per image
PLACEMENT = "before_block"
SIZE_AWARE = False
OPTIONS = {"weighted": False}  # size-weighted means (beyond the SPEC)

# Side of one similarity tile. A (B, T, T) float32 tile is 4 MiB per image, so the N x N
# similarity is never materialised whole: besides its output, one merge holds a few MiB per image
# (tiles, unit rows, a chunk of partners) plus O(N) index vectors, whatever N.
TILE = 1024
STRIP = 256  # rows per strip of the similarity's upper part (work: (1 + STRIP / N) / 2 of N x N)
CHUNK = 32  # columns per chunk of the eager window search (see _window_in_strips)
# elements (all images) of the tiles that the two-pass search keeps for its second pass rather
# than compute again: 64 MiB in float32, the upper tiles of up to about 5,700 tokens (4,096
# tokens: 10.5M). Past it the tiles are recomputed, so memory stays bounded at any N.
KEEP = 1 << 24
SLOTS = 1024  # output tokens averaged per chunk (a (B, SLOTS, D) temporary)
_NEG = float("-inf")


def merge(x: Tensor, valid: Tensor | None = None, *, prefix: int = 0, sizes: Tensor | None = None,
          metric: Tensor | None = None, weighted: bool = False) -> MergeResult:
    """One MPM call on the tokens at the input of a scheduled block (SPEC steps 1-8).

    x:      (B, P + N, D) floating-point tokens; the first ``prefix`` are never merged.
    valid:  (B, N) bool or None (all valid); False only for padding made by an earlier merge.
    The merge-method contract (``mpm_fx.methods``) adds, all beyond the SPEC and off by default:
    metric: (B, P + N, E) what the similarity is computed on instead of x (e.g. the attention
            keys, ``key_metric``); pairs are still averaged in x;
    sizes:  (B, N) how many original patches each token stands for (``token_sizes``);
    weighted: a pair's mean weighted by its tokens' sizes (size-weighted MPM) instead of the
            SPEC's plain mean.
    """
    B, N, all_valid = check_merge(x, valid, prefix, sizes, metric)
    if guard_or_false(B == 0) or guard_or_false(N == 0):  # nothing to merge: x as it is
        empty_map = torch.zeros(B, N, dtype=torch.long, device=x.device)
        return MergeResult(x.clone(), empty_map, all_valid)
    image = x[:, prefix:] if metric is None else metric[:, prefix:]  # the prefix never takes part
    partner = nearest_neighbours(image, all_valid)  # (B, N)
    return merge_pairs(x, valid, prefix, partner, all_valid, sizes if weighted else None)


def check_merge(x, valid, prefix, sizes, metric) -> tuple:
    """The arguments of a merge of mutual pairs (MPM's, local MPM's), checked; returns (B, N,
    the valid mask, all True where ``valid`` is None)."""
    check_tokens(x, "x")
    check_prefix(prefix, x)
    B, N = x.shape[0], x.shape[1] - prefix
    if valid is not None:
        check_mask(valid, (B, N))
    check_metric(metric, x)
    check_sizes(sizes, (B, N))
    all_valid = torch.ones(B, N, dtype=torch.bool, device=x.device) if valid is None else valid
    return B, N, all_valid


def merge_pairs(x: Tensor, valid, prefix: int, partner: Tensor, all_valid: Tensor,
                sizes: Tensor | None) -> MergeResult:
    """SPEC steps 4-8 from the nearest neighbours ``partner`` (B, N): mutual pairs, the map,
    the means (weighted by ``sizes`` when given), padding; and the merged count's range stated
    for compilers (``torch._check``: their value range of the unbacked count)."""
    B, N = partner.shape
    merge_map, leader, mutual = pair_up(partner, all_valid)
    tokens, valid_out = average_pairs(x, prefix, partner, merge_map, leader, mutual,
                                      padded=valid is not None or guard_or_true(B > 1),
                                      sizes=sizes)
    least, most = token_bounds(N, whole=valid is None)
    M = valid_out.shape[1]
    torch._check(M <= most)
    torch._check(M >= least)
    return MergeResult(tokens, merge_map, valid_out)


def token_bounds(n, *, whole: bool) -> tuple:
    """(least, most) image tokens one merge of ``n`` returns, per image and padded: at most n
    (an image may have no mutual pair); at least ceil(n / 2) when every token is valid
    (``whole``: no valid mask, pairs at most halve it), else 1 (slots are never empty, see
    ``average_pairs``: an all-padding image keeps one row)."""
    return ((n + 1) // 2 if whole else 1), n


def nearest_neighbours(x: Tensor, valid: Tensor) -> Tensor:
    """SPEC steps 2-3: b(i) = the smallest j != i whose cos(x_i, x_j) is within ``tie_tolerance``
    of the row's maximum; b(i) = i where no j qualifies. Tokens that are invalid or not all
    finite never pair.

    x: (B, N, D), valid: (B, N) bool -> (B, N) int64.

    The similarity is symmetric, so only its upper part is computed (each pair once, about
    half the products): strips of STRIP rows against the columns from the strip's first row on.
    Row i reads S[i, j] from its own strip for the j from that strip's first row on, and S[j, i]
    from an earlier strip (its column view) for the j before. Two GEMM kernels may round S[i, j]
    and S[j, i] apart by a few eps; the tie window (``tie_tolerance``) is what makes the choice
    of view immaterial.
    Eager, up to TILE tokens, the strips are kept and searched chunk by chunk
    (``_window_in_strips``); otherwise (a compiler tracing the call, or more than TILE tokens)
    the row and column views are reduced block by block in two passes (``_window_over_blocks``).
    """
    x = x.detach()  # indices only: no gradient flows through the search (and out= needs none)
    B, N, D = x.shape
    norm, pairable = row_norms(x, valid)  # SPEC step 2, in float32 for half inputs
    tolerance = tie_tolerance(norm.dtype, D)
    if concrete(x) and N <= TILE:
        first, best = _window_in_strips(x, norm, pairable, tolerance)
    else:
        first, best = _window_over_blocks(x, norm, pairable, tolerance)
    has_partner = pairable & (best > _NEG)
    return torch.where(has_partner, first, torch.arange(N, device=x.device).expand(B, N))


def _window_in_strips(x: Tensor, norm: Tensor, pairable: Tensor, tolerance: float) -> tuple:
    """Eager, N <= TILE: the upper strips are computed once into one (B, P, P) buffer (P = N
    rounded up to CHUNK; the part below the strips is never written nor read). Each strip is
    reduced to CHUNK-column maxima while it is hot, for its rows and, below its diagonal block,
    for its columns; the maxima give each row's best and the first chunk reaching its window;
    one gather of that chunk gives the first j. Only maxima run over the whole strips: they are
    the one reduction CPUs vectorise well (an argmax or a compare is several times slower).
    Returns (first j, best) as (B, N) int64 and (B, N) similarity."""
    B, N, D = x.shape
    sim_dtype, device = norm.dtype, x.device
    P = -(-N // CHUNK) * CHUNK
    every = bool(pairable.all())  # eager only: then no column needs -inf but the padding
    u = torch.zeros(B, P, D, dtype=sim_dtype, device=device)  # scale_rows, into the buffer
    torch.div(x, norm.unsqueeze(-1), out=u[:, :N])
    if not every:
        u[:, :N].masked_fill_(~pairable.unsqueeze(-1), 0)  # NaN * 0 is NaN: fill, not scale
        bias = torch.where(pairable, 0.0, _NEG).to(sim_dtype)
        bias = torch.cat([bias, bias.new_full((B, P - N), _NEG)], 1)  # (B, P)
    s = torch.empty(B, P, P, dtype=sim_dtype, device=device)
    chunk_max = torch.full((B, P, P // CHUNK), _NEG, dtype=sim_dtype, device=device)
    for lo, hi in ranges(P, STRIP):
        strip = s[:, lo:hi, lo:]  # S[i, j] for i in [lo, hi), j >= lo
        torch.bmm(u[:, lo:hi], u[:, lo:].transpose(1, 2), out=strip)
        strip[:, :, :hi - lo].diagonal(dim1=1, dim2=2).fill_(_NEG)  # S[i, i] = -inf
        if not every:
            strip += bias[:, None, lo:]  # the columns and rows of tokens that never pair
            strip += bias[:, lo:hi, None]
        elif P > N:  # padding columns and rows
            s[:, lo:hi, max(N, lo):] = _NEG
            s[:, min(max(N, lo), hi):hi, lo:] = _NEG
        chunk_max[:, lo:hi, lo // CHUNK:] = strip.view(B, hi - lo, -1, CHUNK).amax(-1)
        if hi < P:  # the column view, for the rows after the strip
            below = s[:, lo:hi, hi:].view(B, (hi - lo) // CHUNK, CHUNK, P - hi).amax(-2)
            chunk_max[:, hi:, lo // CHUNK:hi // CHUNK] = below.transpose(1, 2)
    best = chunk_max.amax(-1)  # (B, P)
    threshold = (best - tolerance).unsqueeze(-1)
    chunk = first_true(chunk_max >= threshold)  # (B, P): the first chunk reaching the window
    j = chunk.unsqueeze(-1) * CHUNK + torch.arange(CHUNK, device=device)  # (B, P, CHUNK)
    i = torch.arange(P, device=device).unsqueeze(-1)
    at = torch.where(j >= i // STRIP * STRIP, i * P + j, j * P + i)  # S[i, j], or its column view
    values = s.view(B, P * P)[torch.arange(B, device=device).view(B, 1, 1), at]
    first = chunk * CHUNK + first_true(values >= threshold)
    return first[:, :N], best[:, :N]


def _window_over_blocks(x: Tensor, norm: Tensor, pairable: Tensor, tolerance: float) -> tuple:
    """Any N, eager or traced: upper blocks (STRIP-row strips up to TILE tokens, else TILE x TILE
    tiles, kept for the second pass up to KEEP elements and past it recomputed there so that
    memory stays bounded), reduced in two passes over their row and column views: maxima first,
    then the first j at or above each row's window (a window cannot be decided from running
    maxima). Under a compiler each reduction fuses into one loop over its block. Returns
    (first j, best) as (B, N) int64 and (B, N) similarity."""
    B, N, D = x.shape
    sim_dtype, device = norm.dtype, x.device
    bias = torch.where(pairable, 0.0, _NEG).to(sim_dtype)  # (B, N)
    position = torch.arange(N, device=device).to(sim_dtype)  # exact below 2**24 tokens

    def unit(lo, hi):  # (B, hi - lo, D) normalised rows; rows that never pair are 0
        return scale_rows(x[:, lo:hi], norm[:, lo:hi], pairable[:, lo:hi])

    tiles = ranges(N, TILE)
    if len(tiles) == 1:
        blocks = [((lo, hi), (lo, N)) for lo, hi in ranges(N, STRIP)]
        whole = unit(0, N)
        units = lambda lo, hi: whole[:, lo:hi]  # noqa: E731
    else:
        blocks = [(rows, cols) for k, rows in enumerate(tiles) for cols in tiles[k:]]
        units = unit

    def similarity(rows, cols):  # (B, rows, cols) with -inf where i == j or either never pairs
        (r0, r1), (c0, c1) = rows, cols
        s = torch.bmm(units(r0, r1), units(c0, c1).transpose(1, 2))
        s += bias[:, None, c0:c1]
        s += bias[:, r0:r1, None]
        if c0 == r0:  # S[i, i] = -inf (a mask, not a fill of the diagonal view: exporters
            # such as ONNX's decompose a view's in-place fill into ops they cannot lower)
            rows_at = torch.arange(r0, r1, device=device)
            s = s.masked_fill(rows_at[:, None] == torch.arange(c0, c1, device=device), _NEG)
        return s

    kept = [None] * len(blocks)
    size = sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in blocks)
    keep = len(tiles) == 1 or guard_or_false(B * size <= KEEP)  # an unbacked batch: recompute

    def block(k):  # the k-th block, with its column view (or None) and where that view starts
        s = kept[k] if kept[k] is not None else similarity(*blocks[k])
        if keep:  # one tile: at most N x N / 2 + N x STRIP / 2 elements; else <= KEEP
            kept[k] = s
        (r0, r1), (c0, c1) = blocks[k]
        start = r1 if c0 == r0 else c0  # a diagonal block's column view starts below it
        return s, (s[:, :, start - c0:] if start < c1 else None), start

    best = torch.full((B, N), _NEG, dtype=sim_dtype, device=device)
    for k, (rows, cols) in enumerate(blocks):
        s, below, start = block(k)
        (r0, r1), (_, c1) = rows, cols
        best[:, r0:r1] = torch.maximum(best[:, r0:r1], s.amax(-1))
        if below is not None:
            best[:, start:c1] = torch.maximum(best[:, start:c1], below.amax(-2))
    threshold = best - tolerance
    first = torch.full((B, N), N, dtype=sim_dtype, device=device)
    for k, (rows, cols) in enumerate(blocks):
        s, below, start = block(k)
        (r0, r1), (c0, c1) = rows, cols
        j = torch.where(s >= threshold[:, r0:r1, None], position[c0:c1], N).amin(-1)
        first[:, r0:r1] = torch.minimum(first[:, r0:r1], j)
        if below is not None:
            i = torch.where(below >= threshold[:, None, start:c1], position[r0:r1, None], N).amin(-2)
            first[:, start:c1] = torch.minimum(first[:, start:c1], i)
    return first.long(), best


def pair_up(partner: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SPEC steps 4-6: mutual pairs, their leaders, and the merge map.

    partner: (B, N) nearest neighbours b(i); valid: (B, N).
    Returns merge_map (B, N) int64, leader (B, N) bool, mutual (B, N) bool.
    """
    B, N = partner.shape
    index = torch.arange(N, device=partner.device).expand(B, N)
    mutual = valid & (partner != index) & (partner.gather(1, partner) == index)
    leader = valid & (~mutual | (index < partner))
    anchor = torch.where(mutual, torch.minimum(index, partner), index)
    position = leader.cumsum(1) - 1  # output slot of each leader, raster order
    merge_map = torch.where(valid, position.gather(1, anchor), 0)
    return merge_map, leader, mutual


def average_pairs(x: Tensor, prefix: int, partner: Tensor, merge_map: Tensor, leader: Tensor,
                  mutual: Tensor, padded: bool = True,
                  sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SPEC steps 7-8: each output token is the plain mean of its pair, or its singleton copied
    exactly; images are padded to the largest M of the batch; the prefix stays in front.

    x: (B, P + N, D); partner, merge_map, leader, mutual: (B, N) from the steps before.
    padded: False only when no image can have padding rows (one image, no valid mask).
    sizes: (B, N) or None; given, a pair's mean is weighted by its tokens' sizes (size-weighted
    MPM, beyond the SPEC).
    Returns tokens (B, P + M, D) in x's dtype and valid (B, M) bool.
    Memory: besides the output, one (B, SLOTS, D) chunk of partners at a time.
    """
    B, N = partner.shape
    count = leader.sum(1)  # (B,) tokens each image keeps
    # slots = arange(M) with M = max(count): one nonzero, so M is a data-dependent size that
    # torch.compile and torch.export carry as an unbacked SymInt (one graph for every image).
    # M >= 1 even if every token is padding, so that the 0 that padding maps to always exists.
    slots = torch.nonzero(torch.arange(N, device=x.device) < count.max().clamp_min(1)).squeeze(1)
    index = torch.arange(N, device=x.device).expand(B, N)
    slot_of_token = torch.where(leader, merge_map, N)  # a leader's own slot; others: a spare one
    leader_at = torch.zeros(B, N + 1, dtype=torch.long, device=x.device)
    leader_at = leader_at.scatter(1, slot_of_token, index).index_select(1, slots)  # (B, M)
    is_pair = mutual.gather(1, leader_at)
    partner_at = partner.gather(1, leader_at)

    # the output, prefix included, in one gather: every slot starts as its leader's copy
    head = torch.arange(prefix, device=x.device).expand(B, prefix)
    tokens = gather_rows(x, torch.cat([head, leader_at + prefix], 1))
    if sizes is not None:
        weights = (sizes.gather(1, leader_at), sizes.gather(1, partner_at))
    for lo, hi in ranges(slots.shape[0], SLOTS):  # pairs: the plain mean of the two
        second = gather_rows(x, partner_at[:, lo:hi] + prefix)
        first = tokens[:, prefix + lo:prefix + hi]
        if sizes is None:
            mean = mean_of_two(first, second)
        else:
            mean = weighted_mean_of_two(first, second, weights[0][:, lo:hi], weights[1][:, lo:hi])
        first.copy_(torch.where(is_pair[:, lo:hi, None], mean, first))
    valid_out = slots.unsqueeze(0) < count.unsqueeze(1)  # (B, M)
    if padded:
        tokens[:, prefix:].masked_fill_(~valid_out.unsqueeze(-1), 0)  # padding rows are zeros
    return tokens, valid_out
