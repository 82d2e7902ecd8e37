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
           "nearest_neighbours", "tie_tolerance", "token_bounds", "TILE", "SLOTS"]

# Side of one similarity tile. A (B, T, T) float32 tile is 4 MiB per image, so the N x N
# similarity is never materialised whole: besides its output, one merge holds a few MiB per image
# (tiles, unit rows, a chunk of partners) plus O(N) index vectors, whatever N.
TILE = 1024
SLOTS = 1024  # output tokens averaged per chunk (a (B, SLOTS, D) temporary)
_EPS = 1e-12  # u = x / max(|x|, eps)


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


def merge(x: Tensor, valid: Tensor | None = None, *, prefix: int = 0) -> MergeResult:
    """One MPM call on the tokens at the input of a scheduled block (SPEC steps 1-8).

    x:      (B, P + N, D) floating-point tokens; the first ``prefix`` are never merged.
    valid:  (B, N) bool or None (all valid); False only for padding made by an earlier merge.
    """
    _check_tokens(x, "x")
    if not isinstance(prefix, int) or not 0 <= prefix <= x.shape[1]:
        raise ValueError(f"prefix must be an int in [0, {x.shape[1]}] (tokens in x), got {prefix!r}")
    x_full, x = x, x[:, prefix:]  # the prefix stays in x_full only: it never takes part
    B, N, D = x.shape
    if valid is not None:
        _check_mask(valid, (B, N))
    all_valid = torch.ones(B, N, dtype=torch.bool, device=x.device) if valid is None else valid
    if guard_or_false(B == 0) or guard_or_false(N == 0):  # nothing to merge: x as it is
        empty_map = torch.zeros(B, N, dtype=torch.long, device=x.device)
        return MergeResult(x_full.clone(), empty_map, all_valid)

    partner = nearest_neighbours(x, all_valid)  # (B, N)
    merge_map, leader, mutual = pair_up(partner, all_valid)
    tokens, valid_out = average_pairs(x_full, prefix, partner, merge_map, leader, mutual,
                                      padded=valid is not None or guard_or_true(B > 1))

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

    x: (B, N, D), valid: (B, N) bool -> (B, N) int64. Computed tile by tile (T x T), never N x N.
    With more than one tile per row, the similarities are computed twice (row maxima first):
    a tie window cannot be decided from running maxima.
    """
    B, N, D = x.shape
    sim_dtype = torch.promote_types(x.dtype, torch.float32)  # half inputs: similarity in float32
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=sim_dtype)  # (B, N); NaN/Inf if any entry is
    pairable = valid & torch.isfinite(norm)  # not finite, or if the norm overflows
    norm = torch.where(pairable, norm.clamp_min(_EPS), 1)  # u = x / max(|x|, eps) (SPEC step 2)
    # -inf on the columns of tokens that never pair (an in-place add: cheaper than baddbmm's
    # broadcast input on CPU, and it fuses into the reductions under Inductor)
    bias = torch.where(pairable, 0.0, float("-inf")).to(sim_dtype).unsqueeze(1)  # (B, 1, N)
    tolerance = tie_tolerance(sim_dtype, D)
    self_index = torch.arange(N, device=x.device).expand(B, N)

    def unit(lo, hi):  # (B, hi - lo, D) normalised rows; rows that never pair are 0
        rows = x[:, lo:hi].to(sim_dtype) / norm[:, lo:hi, None]
        return rows.masked_fill_(~pairable[:, lo:hi, None], 0)  # NaN * 0 is NaN: fill, not scale

    def similarity(u_rows, rows, cols):  # (B, T, T'): S[i, j], i in the tile rows, j in cols
        (r0, _), (c0, c1) = rows, cols
        u_cols = u_rows if cols == rows else unit(c0, c1)
        s = torch.bmm(u_rows, u_cols.transpose(1, 2)).add_(bias[:, :, c0:c1])
        if c0 == r0:
            s.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # S[i, i] = -inf
        return s

    tiles = _ranges(N, TILE)
    best_values, best_indices = [], []
    for rows in tiles:
        u_rows = unit(*rows)
        if len(tiles) == 1:  # the whole row in one tile: maximum, then the first j in its window
            s = similarity(u_rows, rows, rows)
            best = s.amax(-1)  # (B, T)
            index = _first_at_least(s, best - tolerance)
        else:
            tile = lambda cols, u_rows=u_rows, rows=rows: similarity(u_rows, rows, cols)  # noqa: E731
            best, index = _window_over_tiles(tile, tiles, tolerance)
        best_values.append(best)
        best_indices.append(index)
    best = torch.cat(best_values, 1) if len(tiles) > 1 else best_values[0]
    index = torch.cat(best_indices, 1) if len(tiles) > 1 else best_indices[0]
    has_partner = pairable & (best > float("-inf"))
    return torch.where(has_partner, index, self_index)


def _window_over_tiles(tile, tiles: list, tolerance: float) -> tuple:
    """Row maxima and the first j in each row's tie window, over column tiles ``tile(cols)``
    computed twice: maxima first, then the window (it cannot be decided from running maxima)."""
    best = None
    for cols in tiles:
        value = tile(cols).amax(-1)
        best = value if best is None else torch.maximum(best, value)
    index = found = None
    for cols in tiles:
        hit = tile(cols) >= (best - tolerance).unsqueeze(-1)
        here = hit.any(-1)
        first = _first_true(hit) + cols[0]
        index = first if index is None else torch.where(here & ~found, first, index)
        found = here if found is None else found | here
    return best, index


def _first_at_least(s: Tensor, threshold: Tensor) -> Tensor:
    """(B, T, T'), (B, T) -> (B, T): the first j with s[..., j] >= threshold (0 if none)."""
    return _first_true(s >= threshold.unsqueeze(-1))


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
                  mutual: Tensor, padded: bool = True) -> tuple[Tensor, Tensor]:
    """SPEC steps 7-8: each output token is the plain mean of its pair, or its singleton copied
    exactly; images are padded to the largest M of the batch; the prefix stays in front.

    x: (B, P + N, D); partner, merge_map, leader, mutual: (B, N) from the steps before.
    padded: False only when no image can have padding rows (one image, no valid mask).
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
    for lo, hi in _ranges(slots.shape[0], SLOTS):  # pairs: the plain mean of the two
        second = _rows(x, partner_at[:, lo:hi] + prefix)
        first = tokens[:, prefix + lo:prefix + hi]
        first.copy_(torch.where(is_pair[:, lo:hi, None], _mean_of_two(first, second), first))
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


def _ranges(n, step: int) -> list[tuple]:
    """[0, n) cut into ranges of at most ``step`` (similarity tiles, slot chunks).

    A symbolic n that cannot be decided (under torch.compile/export the N of a later merge is an
    unbacked SymInt) admits no data-dependent loop, so it is one range: that call then holds its
    whole N x N float32 similarity (64 MiB at N = 4,096) and all its partners at once.
    """
    if guard_or_true(n <= step):  # true for a small n, and for any n that cannot be decided
        return [(0, n)]
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


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
