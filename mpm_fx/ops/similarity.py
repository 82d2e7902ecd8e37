"""What every merge method's similarity search shares: unit rows (SPEC step 2), the rules that
make ties machine-independent, the metric of the methods that merge on attention keys, and the
loop helpers of tiled searches.

Plain tensor code, torch only. Shapes: B batch, N tokens, D (or E) channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

__all__ = ["EPS", "unit_rows", "row_norms", "scale_rows", "tie_tolerance", "QUANTUM", "quantize",
           "key_metric", "projected_keys", "ranges", "concrete", "first_true"]

EPS = 1e-12  # u = x / max(|x|, eps) (SPEC step 2)

# Scores of the counted methods are compared after rounding to multiples of QUANTUM (cosines in
# [-1, 1] become the integers -16384..16384). Two GEMM kernels (Intel or AMD, eager or compiled,
# a token's place in a tile) round a cosine differently by a few eps; a ranking decided by those
# last bits would merge different tokens on different machines. With rounded scores, ties are
# decided by the tokens' indices, the same everywhere: identical or parallel tokens (cosine
# 1 +- a few eps) always round to the same score. Only a cosine within a few eps of a rounding
# boundary (a multiple of QUANTUM plus a half) can still round differently (about 1 cosine in
# 10^4 at D=64).
QUANTUM = 2.0 ** -14


def row_norms(x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SPEC step 2's denominator: (norm, pairable), norm = max(|x|, eps) in the similarity
    dtype (float32 for half inputs, float64 stays float64) where the row pairs, 1 where it does
    not; pairable = valid (all if None) and every entry of the row finite (the norm is NaN/Inf
    if any entry is, or if it overflows). x: (B, N, D) -> (B, N), (B, N) bool."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x.detach(), dim=-1, dtype=dtype)
    pairable = torch.isfinite(norm) if valid is None else valid & torch.isfinite(norm)
    return torch.where(pairable, norm.clamp_min(EPS), 1), pairable


def scale_rows(x: Tensor, norm: Tensor, pairable: Tensor) -> Tensor:
    """x / norm in the norm's dtype, rows that never pair set to 0 (NaN * 0 is NaN: filled, not
    scaled). x (B, K, D), norm and pairable (B, K) from ``row_norms`` -> (B, K, D)."""
    u = x.detach().to(norm.dtype) / norm.unsqueeze(-1)
    return u.masked_fill(~pairable.unsqueeze(-1), 0)


def unit_rows(x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(u, pairable): the rows of x scaled to unit length, u = x / max(|x|, eps) (SPEC step 2),
    0 for rows that never pair (padding, or not all finite). x (B, N, D) -> (B, N, D), (B, N)."""
    norm, pairable = row_norms(x, valid)
    return scale_rows(x, norm, pairable), pairable


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


def quantize(score: Tensor) -> Tensor:
    """floor(score / QUANTUM + 0.5) as int64 (exact: QUANTUM is a power of two); -inf scores
    (no partner) become -2**40, below every real score."""
    q = torch.floor(score / QUANTUM + 0.5)
    return torch.where(torch.isfinite(q), q, -(2.0 ** 40)).to(torch.int64)


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


def projected_keys(z: Tensor, weight: Tensor, bias: Tensor | None = None, *, start: int,
                   stop: int) -> Tensor:
    """The keys an attention would compute from z, every head side by side: rows
    ``start:stop`` of its projection (a fused q/k/v weight's k rows). z (B, T, D_in), weight
    (F, D_in), bias (F,) or None -> (B, T, stop - start) in float32 (float64 stays float64),
    the metric of a merge before a block on its keys (``metric="keys"``)."""
    keys = torch.nn.functional.linear(z, weight[start:stop],
                                      None if bias is None else bias[start:stop])
    return keys.to(torch.promote_types(keys.dtype, torch.float32))


def ranges(n, step: int) -> list[tuple]:
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


def concrete(x: Tensor) -> bool:
    """True when this call runs eagerly on real values: no compiler (dynamo, export, make_fx,
    jit) is tracing it, so a data-dependent Python branch is allowed."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not isinstance(x.shape[0], torch.SymInt))


def first_true(hit: Tensor, dim: int = -1) -> Tensor:
    """The index of the first True along ``dim`` (0 if none): argmax of uint8, which returns the
    first maximum (bool has no argmax)."""
    return hit.to(torch.uint8).argmax(dim)
