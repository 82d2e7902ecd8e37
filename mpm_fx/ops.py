"""Mutual Pair Merging (MPM), the op of SPEC.md, in plain aten ops.

Each function is one step of the SPEC. It is written as ordinary tensor code (no custom op) so that
the same source runs in eager mode, traces into one ``torch.compile`` graph and survives
``torch.export`` + AOTInductor. Shapes in comments: B batch, P prefix tokens, N image tokens in,
M tokens out, D channels, T similarity tile side.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

__all__ = ["MergeResult", "merge", "compose", "reconstruct", "key_mask", "mask_scores", "per_key",
           "leaders", "gather_positions", "mask_keys", "token_sizes", "key_metric",
           "nearest_neighbours", "tie_tolerance", "token_bounds", "TILE", "STRIP", "CHUNK", "SLOTS"]

# Side of one similarity tile. A (B, T, T) float32 tile is 4 MiB per image, so the N x N
# similarity is never materialised whole: besides its output, one merge holds a few MiB per image
# (tiles, unit rows, a chunk of partners) plus O(N) index vectors, whatever N.
TILE = 1024
STRIP = 256  # rows per strip of the similarity's upper part (work: (1 + STRIP / N) / 2 of N x N)
CHUNK = 32  # columns per chunk of the eager window search (see _window_in_strips)
SLOTS = 1024  # output tokens averaged per chunk (a (B, SLOTS, D) temporary)
_EPS = 1e-12  # u = x / max(|x|, eps)
_NEG = float("-inf")


class MergeResult(NamedTuple):
    """What one MPM call returns.

    tokens:    (B, P + M, D) prefix tokens, then merged tokens in the raster order of their leaders;
               rows past an image's own count are zero padding.
    merge_map: (B, N) int64; for every input image token, the index (among the M merged image
               tokens, prefix excluded) of the token it went to. Padding inputs map to 0
               (M >= 1 whenever N >= 1, so a reconstruction gather never leaves the tensor).
    valid:     (B, M) bool; False marks padding rows.
    """

    tokens: Tensor
    merge_map: Tensor
    valid: Tensor


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
    _check_tokens(x, "x")
    if not isinstance(prefix, int) or prefix < 0 or not guard_or_true(prefix <= x.shape[1]):
        raise ValueError(f"prefix must be an int in [0, {x.shape[1]}] (tokens in x), got {prefix!r}")
    x_full, x = x, x[:, prefix:]  # the prefix stays in x_full only: it never takes part
    B, N, D = x.shape
    if valid is not None:
        _check_mask(valid, (B, N))
    check_metric(metric, x_full)
    check_sizes(sizes, (B, N))
    all_valid = torch.ones(B, N, dtype=torch.bool, device=x.device) if valid is None else valid
    if guard_or_false(B == 0) or guard_or_false(N == 0):  # nothing to merge: x as it is
        empty_map = torch.zeros(B, N, dtype=torch.long, device=x.device)
        return MergeResult(x_full.clone(), empty_map, all_valid)

    partner = nearest_neighbours(x if metric is None else metric[:, prefix:], all_valid)  # (B, N)
    merge_map, leader, mutual = pair_up(partner, all_valid)
    tokens, valid_out = average_pairs(x_full, prefix, partner, merge_map, leader, mutual,
                                      padded=valid is not None or guard_or_true(B > 1),
                                      sizes=sizes if weighted else None)

    least, most = token_bounds(N, whole=valid is None)
    M = valid_out.shape[1]
    torch._check(M <= most)  # the compiler's value range of the merged count
    torch._check(M >= least)
    return MergeResult(tokens, merge_map, valid_out)


def token_bounds(n, *, whole: bool) -> tuple:
    """(least, most) image tokens one merge of ``n`` returns, per image and padded: at most n
    (an image may have no mutual pair); at least ceil(n / 2) when every token is valid
    (``whole``: no valid mask, pairs at most halve it), else 1 (slots are never empty, see
    ``average_pairs``: an all-padding image keeps one row)."""
    return ((n + 1) // 2 if whole else 1), n


def tie_tolerance(dtype: torch.dtype, channels: int) -> float:
    """Similarities within this of a row's maximum count as ties (SPEC step 3, as mpm_fx reads it).

    ``4 * sqrt(D) * eps(dtype)`` of the similarity dtype: 9.3e-6 at D = 384 in float32, 1.7e-14
    in float64. Two GEMM kernels (Intel or AMD, eager or compiled, a token's place in a tile)
    round the same cosine differently by a few eps (at most 9 eps seen for D <= 1024); a tie
    broken by those last bits would pair different tokens on different machines. So the rule is
    "the smallest j whose similarity is within ``tie_tolerance`` of the row's maximum", which is
    the exact rule whenever a row's top similarities are further apart than that, and gives the
    same partner for tokens that are identical (or parallel) on every machine.
    """
    return 4.0 * math.sqrt(max(channels, 1)) * torch.finfo(dtype).eps


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
    sim_dtype = torch.promote_types(x.dtype, torch.float32)  # half inputs: similarity in float32
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=sim_dtype)  # (B, N); NaN/Inf if any entry is
    pairable = valid & torch.isfinite(norm)  # not finite, or if the norm overflows
    norm = torch.where(pairable, norm.clamp_min(_EPS), 1)  # u = x / max(|x|, eps) (SPEC step 2)
    tolerance = tie_tolerance(sim_dtype, D)
    if _concrete(x) and N <= TILE:
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
    u = torch.zeros(B, P, D, dtype=sim_dtype, device=device)
    torch.div(x, norm.unsqueeze(-1), out=u[:, :N])
    if not every:
        u[:, :N].masked_fill_(~pairable.unsqueeze(-1), 0)  # NaN * 0 is NaN: fill, not scale
        bias = torch.where(pairable, 0.0, _NEG).to(sim_dtype)
        bias = torch.cat([bias, bias.new_full((B, P - N), _NEG)], 1)  # (B, P)
    s = torch.empty(B, P, P, dtype=sim_dtype, device=device)
    chunk_max = torch.full((B, P, P // CHUNK), _NEG, dtype=sim_dtype, device=device)
    for lo, hi in _ranges(P, STRIP):
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
    chunk = _first_true(chunk_max >= threshold)  # (B, P): the first chunk reaching the window
    j = chunk.unsqueeze(-1) * CHUNK + torch.arange(CHUNK, device=device)  # (B, P, CHUNK)
    i = torch.arange(P, device=device).unsqueeze(-1)
    at = torch.where(j >= i // STRIP * STRIP, i * P + j, j * P + i)  # S[i, j], or its column view
    values = s.view(B, P * P)[torch.arange(B, device=device).view(B, 1, 1), at]
    first = chunk * CHUNK + _first_true(values >= threshold)
    return first[:, :N], best[:, :N]


def _window_over_blocks(x: Tensor, norm: Tensor, pairable: Tensor, tolerance: float) -> tuple:
    """Any N, eager or traced: upper blocks (STRIP-row strips up to TILE tokens, else TILE x TILE
    tiles recomputed in the second pass so that memory stays bounded), reduced in two passes over
    their row and column views: maxima first, then the first j at or above each row's window (a
    window cannot be decided from running maxima). Under a compiler each reduction fuses into one
    loop over its block. Returns (first j, best) as (B, N) int64 and (B, N) similarity."""
    B, N, D = x.shape
    sim_dtype, device = norm.dtype, x.device
    bias = torch.where(pairable, 0.0, _NEG).to(sim_dtype)  # (B, N)
    position = torch.arange(N, device=device).to(sim_dtype)  # exact below 2**24 tokens

    def unit(lo, hi):  # (B, hi - lo, D) normalised rows; rows that never pair are 0
        rows = x[:, lo:hi].to(sim_dtype) / norm[:, lo:hi, None]
        return rows.masked_fill_(~pairable[:, lo:hi, None], 0)  # NaN * 0 is NaN: fill, not scale

    tiles = _ranges(N, TILE)
    if len(tiles) == 1:
        blocks = [((lo, hi), (lo, N)) for lo, hi in _ranges(N, STRIP)]
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
        if c0 == r0:
            s[:, :, :r1 - r0].diagonal(dim1=1, dim2=2).fill_(_NEG)
        return s

    kept = [None] * len(blocks)

    def block(k):  # the k-th block, with its column view (or None) and where that view starts
        s = kept[k] if kept[k] is not None else similarity(*blocks[k])
        if len(tiles) == 1:
            kept[k] = s  # at most N x N / 2 + N x STRIP / 2 elements in all; else recomputed
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


def _concrete(x: Tensor) -> bool:
    """True when this call runs eagerly on real values: no compiler (dynamo, export, make_fx,
    jit) is tracing it, so a data-dependent Python branch is allowed."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not isinstance(x.shape[0], torch.SymInt))


def _first_true(hit: Tensor) -> Tensor:
    return hit.to(torch.uint8).argmax(-1)  # argmax returns the first maximum; bool has none


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
    tokens = _rows(x, torch.cat([head, leader_at + prefix], 1))
    if sizes is not None:
        weights = (sizes.gather(1, leader_at), sizes.gather(1, partner_at))
    for lo, hi in _ranges(slots.shape[0], SLOTS):  # pairs: the plain mean of the two
        second = _rows(x, partner_at[:, lo:hi] + prefix)
        first = tokens[:, prefix + lo:prefix + hi]
        if sizes is None:
            mean = _mean_of_two(first, second)
        else:
            mean = _weighted_mean_of_two(first, second, weights[0][:, lo:hi], weights[1][:, lo:hi])
        first.copy_(torch.where(is_pair[:, lo:hi, None], mean, first))
    valid_out = slots.unsqueeze(0) < count.unsqueeze(1)  # (B, M)
    if padded:
        tokens[:, prefix:].masked_fill_(~valid_out.unsqueeze(-1), 0)  # padding rows are zeros
    return tokens, valid_out


def compose(earlier_map: Tensor, later_map: Tensor) -> Tensor:
    """total = later[earlier]: (B, N0) into (B, N1) -> (B, N0) into the later call's tokens."""
    for name, m in (("earlier_map", earlier_map), ("later_map", later_map)):
        _check_map(m, name)
    if earlier_map.shape[0] != later_map.shape[0]:
        raise ValueError(f"compose: batch sizes differ: earlier_map {tuple(earlier_map.shape)}, "
                         f"later_map {tuple(later_map.shape)}")
    return later_map.gather(1, earlier_map)


def leaders(total_map: Tensor, valid: Tensor) -> Tensor:
    """The leader of every merged token: the first (smallest) original index among the tokens it
    stands for, the position it carries for a position-aware model. total_map (B, N0) from the
    original image tokens (a map composed over every merge so far), valid (B, M) -> (B, M)
    int64; padding rows get 0 (a valid index: what a padded row reads is never used)."""
    B, N0 = total_map.shape
    index = torch.arange(N0, device=total_map.device).expand(B, N0)
    first = torch.zeros(valid.shape, dtype=torch.long, device=total_map.device)
    return first.scatter_reduce(1, total_map, index, "amin", include_self=False)


def gather_positions(table: Tensor, leaders: Tensor, *, axes: tuple, rank: int,
                     per_image: int = 1) -> Tensor:
    """A token-indexed table (rotary cos/sin, a relative-position bias) for merged tokens: along
    each token axis, merged token k reads the table's entry of its leader.

    table:   a tensor of the model, the same for every image, with the original token count
             along ``axes``; it meets tokens laid out (B, ..., tokens, ...) of rank ``rank``.
    leaders: (B, M) from ``leaders``.
    axes:    ((axis, prefix), ...), axis counted from the right (negative); ``prefix`` is the
             number of prefix tokens the axis holds first (kept as they are: P when the axis has
             P + N0 entries, 0 when it has the N0 image tokens only).
    per_image: rows of the tokens' first dim per image (> 1 when it is batch-major flattened,
             e.g. (B * H, T, E)).
    Returns the table with ``rank`` dims, batch first: (B * per_image, ..., P + M or M along each
    axis, ...), broadcastable against the tokens it meets (a leading 1 of the table becomes B).
    """
    B = leaders.shape[0]
    out = table.reshape((1,) * (rank - table.dim()) + tuple(table.shape))
    for axis, prefix in axes:
        index = leaders
        if prefix:
            head = torch.arange(prefix, device=leaders.device).expand(B, prefix)
            index = torch.cat([head, leaders + prefix], 1)
        shape = [1] * rank
        shape[0], shape[axis] = B, index.shape[1]
        out = torch.take_along_dim(out, index.reshape(shape), dim=axis)
    if per_image > 1:
        out = out.unsqueeze(1).expand(B, per_image, *out.shape[1:]).flatten(0, 1)
    return out


def mask_keys(mask: Tensor, valid: Tensor, *, prefix: int = 0) -> Tensor:
    """An attention mask or bias (*L, Tq, P + M) that also hides padded keys: a boolean mask is
    and-ed with the key mask, a float bias gets -inf there. Its leading dims L hold the batch
    first (batch-major), or are 1 (the same for every image)."""
    B = valid.shape[0]
    if mask.shape[0] == 1 and B > 1:
        mask = mask.expand(B, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask & key_mask(valid, mask, prefix=prefix)
    return mask_scores(mask, valid, prefix=prefix)


def reconstruct(tokens: Tensor, merge_map: Tensor, *, prefix: int = 0) -> Tensor:
    """full[i] = tokens[merge_map[i]]: (B, P + M, D) and (B, N0) -> (B, P + N0, D), prefix in front."""
    _check_tokens(tokens, "tokens")
    _check_map(merge_map, "merge_map")
    if merge_map.shape[0] != tokens.shape[0]:
        raise ValueError(f"reconstruct: batch sizes differ: tokens {tuple(tokens.shape)}, "
                         f"merge_map {tuple(merge_map.shape)}")
    if not isinstance(prefix, int) or not 0 <= prefix <= tokens.shape[1]:
        raise ValueError(f"prefix must be an int in [0, {tokens.shape[1]}], got {prefix!r}")
    head, body = tokens[:, :prefix], tokens[:, prefix:]
    full = _rows(body, merge_map)
    return torch.cat([head, full], 1) if prefix else full


def key_mask(valid: Tensor, keys: Tensor, *, prefix: int = 0) -> Tensor:
    """SPEC step 8: which keys a later attention may read. (B, M) valid and keys (*L, P + M, E),
    whose leading dims L hold the batch first (batch-major, e.g. (B, H) or (B * H,)) ->
    bool (*L, 1, P + M): True for prefix and valid tokens, broadcastable over the queries."""
    B, M = valid.shape
    full = torch.cat([valid.new_ones(B, prefix), valid], 1) if prefix else valid  # (B, P + M)
    return per_key(full, keys)


def per_key(values: Tensor, keys: Tensor) -> Tensor:
    """One value per image and key, (B, T), laid out for keys (*L, T, E) whose leading dims L
    hold the batch first (batch-major: (B, H), (B * H,), ...) -> (*L, 1, T)."""
    B, T = values.shape
    lead = keys.shape[:-2]
    per_image = 1
    for size in lead:
        per_image = per_image * size
    return values[:, None, :].expand(B, per_image // B, T).reshape(*lead, 1, T)


def mask_scores(scores: Tensor, valid: Tensor, *, prefix: int = 0) -> Tensor:
    """Attention logits (*L, Tq, P + M) with padded keys set to -inf (explicit-softmax attention)."""
    return scores.masked_fill(~key_mask(valid, scores, prefix=prefix), float("-inf"))


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, k]] for every b, k: (B, N, D), (B, K) -> (B, K, D). Advanced indexing, which
    is 2-3x faster on CPU than gather with an index expanded over D."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), index]


def _mean_of_two(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype in (torch.float16, torch.bfloat16):  # sum in float32: no overflow, one rounding
        return ((a.float() + b.float()) * 0.5).to(a.dtype)
    return (a + b) * 0.5


def _weighted_mean_of_two(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """(wa a + wb b) / (wa + wb), weights (B, K) per row; in float32 for half inputs (one
    rounding), in x's dtype otherwise."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    wa, wb = wa.to(dtype)[..., None], wb.to(dtype)[..., None]
    return ((a.to(dtype) * wa + b.to(dtype) * wb) / (wa + wb)).to(a.dtype)


def token_sizes(total_map: Tensor, valid: Tensor) -> Tensor:
    """How many original image tokens each merged token stands for: (B, N0) map into (B, M)
    tokens -> (B, M) float32; padding rows get 0."""
    B, M = valid.shape
    counts = torch.zeros(B, M, dtype=torch.float32, device=total_map.device)
    return counts.scatter_add(1, total_map, torch.ones_like(total_map, dtype=torch.float32))


def key_metric(keys: Tensor, tokens: Tensor, *, transposed: bool = False) -> Tensor:
    """The similarity metric of ToMe: an attention's keys averaged over its heads.

    keys:   (*L, T, E) with the batch first in its leading dims (batch-major: (B, H), (B * H,),
            ...), or (*L, E, T) with ``transposed`` (the right operand of q kᵀ);
    tokens: (B, T, D), the tokens the keys were computed from (they give B).
    Returns (B, T, E) in float32 (the similarity's dtype for every input dtype but float64).
    """
    if transposed:
        keys = keys.transpose(-2, -1)
    T, E = keys.shape[-2], keys.shape[-1]
    dtype = torch.promote_types(keys.dtype, torch.float32)
    return keys.reshape(tokens.shape[0], -1, T, E).to(dtype).mean(1)


def check_metric(metric, x: Tensor) -> None:
    """A merge's metric: None, or (B, P + N, E) floating point with x's batch and tokens."""
    if metric is None:
        return
    if not isinstance(metric, Tensor) or metric.dim() != 3 or not metric.dtype.is_floating_point:
        desc = (f"{metric.dim()}-D {metric.dtype}" if isinstance(metric, Tensor)
                else type(metric).__name__)
        raise ValueError(f"metric must be a (B, P + N, E) floating-point tensor (what the "
                         f"similarity is computed on), got {desc}")
    if not (guard_or_true(metric.shape[0] == x.shape[0])
            and guard_or_true(metric.shape[1] == x.shape[1])):
        raise ValueError(f"metric must have the batch and tokens of x {tuple(x.shape[:2])}, got "
                         f"{tuple(metric.shape[:2])}")


def check_sizes(sizes, shape) -> None:
    """A merge's sizes: None, or (B, N) floating point (patches per image token)."""
    if sizes is None:
        return
    if not isinstance(sizes, Tensor) or not sizes.dtype.is_floating_point:
        got = sizes.dtype if isinstance(sizes, Tensor) else type(sizes).__name__
        raise ValueError(f"sizes must be a floating-point (B, N) tensor (patches per image "
                         f"token, from token_sizes), got {got}")
    if not all(guard_or_true(a == b) for a, b in zip(sizes.shape, shape)) or sizes.dim() != 2:
        raise ValueError(f"sizes must have shape (B, N) = {tuple(shape)} (image tokens, prefix "
                         f"excluded), got {tuple(sizes.shape)}")


def _ranges(n, step: int) -> list[tuple]:
    """[0, n) cut into ranges of at most ``step`` (similarity tiles, slot chunks).

    A symbolic n (under torch.compile/export the N of a later merge is an unbacked SymInt) admits
    no Python loop, so it is one range: that call then holds its whole N x N float32 similarity
    (64 MiB at N = 4,096) and all its partners at once.
    """
    if not _known(n) or n <= step:
        return [(0, n)]
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _known(n) -> bool:
    """Whether Python may loop over n: an int or a backed SymInt (guarded), not an unbacked one.
    Written with guard_or_false, which Dynamo traces (it hides SymInts behind ``int``): the
    parity of an unbacked size is unknown, that of any other is known."""
    return guard_or_false(n % 2 == 0) or guard_or_false(n % 2 == 1)


def _check_tokens(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, N, D), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, N, D) (batch, tokens, channels), got "
                         f"{x.dim()}-D shape {tuple(x.shape)}; add a batch dim with {name}[None]")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point (float16/bfloat16/float32/float64), got "
                         f"{x.dtype}; cast it first, e.g. {name}.float()")


def _check_mask(valid, shape) -> None:
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a bool tensor (True = real token), got {got}")
    if tuple(valid.shape) != tuple(shape):
        raise ValueError(f"valid must have shape (B, N) = {tuple(shape)} (image tokens, prefix "
                         f"excluded), got {tuple(valid.shape)}")


def _check_map(m, name: str) -> None:
    if not isinstance(m, Tensor) or m.dim() != 2 or m.dtype != torch.long:
        desc = f"{m.dim()}-D {m.dtype}" if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a (B, N) int64 tensor, got {desc}")
