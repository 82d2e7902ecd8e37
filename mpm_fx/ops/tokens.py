"""Merged tokens and their maps: what every merge method returns, how maps compose, how the full
grid is rebuilt, and what the maps say about the merged tokens (sizes, leaders, positions).

Plain tensor code, torch only. Shapes: B batch, P prefix tokens, N0 original image tokens, N
image tokens into a merge, M out, D channels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_true

__all__ = ["MergeResult", "compose", "reconstruct", "leaders", "gather_positions", "token_sizes",
           "gather_rows", "mean_of_two", "weighted_mean_of_two", "check_tokens", "check_prefix",
           "check_mask", "check_map", "check_metric", "check_sizes"]


class MergeResult(NamedTuple):
    """What one merge returns (every method: the contract of ``mpm_fx.methods``).

    tokens:    (B, P + M, D) prefix tokens, then merged tokens; rows past an image's own count
               are zero padding.
    merge_map: (B, N) int64; for every input image token, the index (among the M merged image
               tokens, prefix excluded) of the token it went to. Padding inputs map to 0
               (M >= 1 whenever N >= 1, so a reconstruction gather never leaves the tensor).
    valid:     (B, M) bool; False marks padding rows.
    """

    tokens: Tensor
    merge_map: Tensor
    valid: Tensor


def compose(earlier_map: Tensor, later_map: Tensor) -> Tensor:
    """total = later[earlier]: (B, N0) into (B, N1) -> (B, N0) into the later call's tokens."""
    for name, m in (("earlier_map", earlier_map), ("later_map", later_map)):
        check_map(m, name)
    if earlier_map.shape[0] != later_map.shape[0]:
        raise ValueError(f"compose: batch sizes differ: earlier_map {tuple(earlier_map.shape)}, "
                         f"later_map {tuple(later_map.shape)}")
    return later_map.gather(1, earlier_map)


def reconstruct(tokens: Tensor, merge_map: Tensor, *, prefix: int = 0) -> Tensor:
    """full[i] = tokens[merge_map[i]]: (B, P + M, D) and (B, N0) -> (B, P + N0, D), prefix in front."""
    check_tokens(tokens, "tokens")
    check_map(merge_map, "merge_map")
    if merge_map.shape[0] != tokens.shape[0]:
        raise ValueError(f"reconstruct: batch sizes differ: tokens {tuple(tokens.shape)}, "
                         f"merge_map {tuple(merge_map.shape)}")
    if not isinstance(prefix, int) or not 0 <= prefix <= tokens.shape[1]:
        raise ValueError(f"prefix must be an int in [0, {tokens.shape[1]}], got {prefix!r}")
    head, body = tokens[:, :prefix], tokens[:, prefix:]
    full = gather_rows(body, merge_map)
    return torch.cat([head, full], 1) if prefix else full


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


def token_sizes(total_map: Tensor, valid: Tensor) -> Tensor:
    """How many original image tokens each merged token stands for: (B, N0) map into (B, M)
    tokens -> (B, M) float32; padding rows get 0."""
    B, M = valid.shape
    counts = torch.zeros(B, M, dtype=torch.float32, device=total_map.device)
    return counts.scatter_add(1, total_map, torch.ones_like(total_map, dtype=torch.float32))


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, k]] for every b, k: (B, N, D), (B, K) -> (B, K, D). Advanced indexing, which
    is 2-3x faster on CPU than gather with an index expanded over D."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), index]


def mean_of_two(a: Tensor, b: Tensor) -> Tensor:
    """(a + b) / 2 in a's dtype; half inputs are summed in float32 (no overflow, one rounding)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return ((a.float() + b.float()) * 0.5).to(a.dtype)
    return (a + b) * 0.5


def weighted_mean_of_two(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """(wa a + wb b) / (wa + wb), weights (B, K) per row; in float32 for half inputs (one
    rounding), in x's dtype otherwise."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    wa, wb = wa.to(dtype)[..., None], wb.to(dtype)[..., None]
    return ((a.to(dtype) * wa + b.to(dtype) * wb) / (wa + wb)).to(a.dtype)


def check_tokens(x, name: str) -> None:
    """(B, N, D) floating point, or ValueError naming the fix."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, N, D), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, N, D) (batch, tokens, channels), got "
                         f"{x.dim()}-D shape {tuple(x.shape)}; add a batch dim with {name}[None]")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point (float16/bfloat16/float32/float64), got "
                         f"{x.dtype}; cast it first, e.g. {name}.float()")


def check_prefix(prefix, x: Tensor) -> None:
    """The prefix tokens a merge leaves alone: an int in [0, tokens of x]."""
    if not isinstance(prefix, int) or prefix < 0 or not guard_or_true(prefix <= x.shape[1]):
        raise ValueError(f"prefix must be an int in [0, {x.shape[1]}] (tokens in x), got {prefix!r}")


def check_mask(valid, shape) -> None:
    """A merge's valid mask: bool (B, N)."""
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a bool tensor (True = real token), got {got}")
    if tuple(valid.shape) != tuple(shape):
        raise ValueError(f"valid must have shape (B, N) = {tuple(shape)} (image tokens, prefix "
                         f"excluded), got {tuple(valid.shape)}")


def check_map(m, name: str) -> None:
    """A merge map: (B, N) int64."""
    if not isinstance(m, Tensor) or m.dim() != 2 or m.dtype != torch.long:
        desc = f"{m.dim()}-D {m.dtype}" if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a (B, N) int64 tensor, got {desc}")


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
