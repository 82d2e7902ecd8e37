"""What the count-based merge methods share: unit rows, quantized scores with their tie rule,
the group means, and the checks of a count. Plain tensor code, torch only (op layer).

Shapes: B batch, P prefix tokens, N image tokens in, M = N - r out, D channels, E metric channels.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_true

from mpm_fx.ops import MergeResult, _check_tokens, check_metric, check_sizes

__all__ = ["QUANTUM", "quantize", "unit_rows", "average_groups", "check_count", "result"]

# Scores are compared after rounding to multiples of QUANTUM (cosines in [-1, 1] become the
# integers -16384..16384). Two GEMM kernels (Intel or AMD, eager or compiled, a token's place in
# a tile) round a cosine differently by a few eps; a ranking decided by those last bits would
# merge different tokens on different machines. With rounded scores, ties are decided by the
# tokens' indices, the same everywhere: identical or parallel tokens (cosine 1 +- a few eps)
# always round to the same score. Only a cosine within a few eps of a rounding boundary (a
# multiple of QUANTUM plus a half) can still round differently (about 1 cosine in 10^4 at D=64).
QUANTUM = 2.0 ** -14


def quantize(score: Tensor) -> Tensor:
    """floor(score / QUANTUM + 0.5) as int64 (exact: QUANTUM is a power of two); -inf scores
    (no partner) become -2**40, below every real score."""
    q = torch.floor(score / QUANTUM + 0.5)
    return torch.where(torch.isfinite(q), q, -(2.0 ** 40)).to(torch.int64)


def unit_rows(metric: Tensor) -> tuple[Tensor, Tensor]:
    """(u, pairable): metric rows scaled to unit length in the similarity dtype (float32 for
    half inputs, float64 stays float64), u = m / max(|m|, 1e-12) as MPM's SPEC step 2; rows that
    are not all finite become 0 and are not pairable."""
    dtype = torch.promote_types(metric.dtype, torch.float32)
    m = metric.detach().to(dtype)
    norm = torch.linalg.vector_norm(m, dim=-1)  # NaN/Inf if any entry is, or if it overflows
    pairable = torch.isfinite(norm)
    u = m / torch.where(pairable, norm.clamp_min(1e-12), 1).unsqueeze(-1)
    return u.masked_fill(~pairable.unsqueeze(-1), 0), pairable


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
    total = torch.zeros(B * M, D, dtype=dtype, device=x.device).index_add(
        0, slot, rows.to(dtype) * weights.unsqueeze(1))
    weight = weights.new_zeros(B * M).index_add(0, slot, weights)
    members = torch.zeros(B * M, dtype=torch.long, device=x.device).index_add(
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
    _check_tokens(x, "x")
    if not isinstance(prefix, int) or prefix < 0 or not guard_or_true(prefix <= x.shape[1]):
        raise ValueError(f"prefix must be an int in [0, {x.shape[1]}] (tokens in x), got {prefix!r}")
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
