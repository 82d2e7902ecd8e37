"""What the merge methods with a fixed count share: the group means, the checks of a count, and
their result. Plain tensor code, torch only (op layer).

Shapes: B batch, P prefix tokens, N image tokens in, M = N - r out, D channels, E metric channels.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_true

from mpm_fx.ops.similarity import unit_rows
from mpm_fx.ops.tokens import MergeResult, check_metric, check_prefix, check_sizes, check_tokens

__all__ = ["merge_counted", "average_groups", "check_count", "result"]


def merge_counted(name: str, groups, x: Tensor, valid, prefix: int, sizes, metric, r: int,
                  weighted: bool) -> MergeResult:
    """One merge of a method that removes ``r`` image tokens: the checks, the rows of its
    metric scaled to unit length (``unit_rows``), ``groups(u, pairable, r)`` -> (B, N) group of
    every image token in [0, N - r) (the method itself), then the group means (weighted by
    ``sizes`` if ``weighted``) and the result. ``r = 0`` returns the tokens as they are."""
    check_count(name, x, valid, prefix, sizes, metric, r)
    B, N = x.shape[0], x.shape[1] - prefix
    if r == 0:
        return result(x.clone(), torch.arange(N, device=x.device).expand(B, N).clone(), N)
    u, pairable = unit_rows((x if metric is None else metric)[:, prefix:])
    group = groups(u, pairable, r)
    tokens = average_groups(x, prefix, group, N - r, sizes if weighted else None)
    return result(tokens, group, N - r)


def average_groups(x: Tensor, prefix: int, group: Tensor, M: int,
                   sizes: Tensor | None) -> Tensor:
    """out[m] = the mean of the image tokens x[i] with group[i] = m, weighted by ``sizes`` when
    given (patches each token stands for), plain otherwise; a group of one token is that token,
    copied exactly; the prefix stays in front.

    x (B, P + N, D), group (B, N) int64 in [0, M) with every slot used -> (B, P + M, D) in x's
    dtype (sums in float32 for half inputs, one rounding)."""
    head, image = x[:, :prefix], x[:, prefix:]
    B, N, D = image.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    slot = (group + torch.arange(B, device=x.device).unsqueeze(1) * M).flatten()  # (B N,)
    rows = image.reshape(B * N, D)
    weights = (torch.ones(B * N, dtype=dtype, device=x.device) if sizes is None
               else sizes.reshape(B * N).to(dtype))
    # scatter_add, not index_add: the same sums in eager, and Inductor calls the same kernel
    # (it turns index_add into a loop of atomic adds, 3-4x slower on CPU)
    total = torch.zeros(B * M, D, dtype=dtype, device=x.device).scatter_add(
        0, slot.unsqueeze(1).expand(B * N, D), rows.to(dtype) * weights.unsqueeze(1))
    weight = weights.new_zeros(B * M).scatter_add(0, slot, weights)
    members = torch.zeros(B * M, dtype=torch.long, device=x.device).scatter_add(
        0, slot, torch.ones_like(slot))
    last = torch.zeros_like(members).scatter_reduce(  # a member of each slot (its last)
        0, slot, torch.arange(B * N, device=x.device), "amax", include_self=False)
    mean = (total / weight.unsqueeze(1)).to(x.dtype)
    tokens = torch.where((members == 1).unsqueeze(1), rows.index_select(0, last), mean)
    tokens = tokens.reshape(B, M, D)
    return torch.cat([head, tokens], 1) if prefix else tokens


def check_count(name: str, x: Tensor, valid, prefix: int, sizes, metric, r) -> None:
    """The arguments of a count-based merge: tokens, no padding mask (every image keeps the same
    count, so none is ever made), and 0 <= r <= N // 2."""
    check_tokens(x, "x")
    check_prefix(prefix, x)
    if valid is not None:
        raise ValueError(f"{name} merges every image to the same count and takes no valid mask "
                         "(it never pads); pass valid=None")
    B, N = x.shape[0], x.shape[1] - prefix
    check_metric(metric, x)
    check_sizes(sizes, (B, N))
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r must be an int (image tokens to remove), got {r!r}")
    if r < 0 or not guard_or_true(r <= N // 2):
        raise ValueError(f"r={r} is out of range for {N} image tokens: {name} removes 0..{N // 2} "
                         "(at most half of them) in one merge; lower r")


def result(tokens: Tensor, group: Tensor, M: int) -> MergeResult:
    """The merge contract's result of a count-based method: M tokens per image, none padding."""
    return MergeResult(tokens, group, torch.ones(group.shape[0], M, dtype=torch.bool,
                                                  device=group.device))
