"""Size-aware ("proportional") attention that keeps the flash kernel — an option beyond the paper.

After a merge one token stands for several patches, but plain attention counts it once. ToMe's
proportional attention adds ``log(size_j)`` to the logit of every key j. Two forms, the same
maths, chosen by where the attention runs:

- on the CPU, an additive float ``attn_mask`` of one row per image, broadcast over heads and
  queries: the CPU's flash kernel takes it at almost no cost (measured: +0-5 % over no mask,
  where the folded form costs +30-45 %, docs/benchmarks.md);
- on a GPU, whose flash kernels take no mask, the bias is folded into the dot product: queries
  get one more channel holding 1, keys one holding ``log(size_j) / scale``, so
  ``scale * q'.k' = scale * q.k + log(size_j)``. The head dim is padded with zeros to a multiple
  of 8 (what flash kernels take), the padded value channels are sliced off, and the softmax
  scale is passed explicitly (SDPA's default would follow the padded dim). The per-image
  attention of ``varlen`` uses this form too.

Imports only torch (and ``mpm_fx.ops``). Shapes: B batch, P prefix tokens, M merged tokens,
T = P + M keys, L the leading dims of q/k/v with the batch first (batch-major, e.g. (B, H) or
(B * H,)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mpm_fx.ops.masks import per_key
from mpm_fx.ops.tokens import token_sizes

__all__ = ["log_token_sizes", "proportional_sdpa", "folded_sdpa", "add_log_sizes", "FLASH_MULTIPLE"]

FLASH_MULTIPLE = 8  # head dims of flash kernels are multiples of 8


def log_token_sizes(total_map: Tensor, valid: Tensor, *, prefix: int = 0) -> Tensor:
    """log of how many original patches each token stands for: (B, N0) map into (B, M) tokens
    -> (B, P + M) float32; prefix tokens have size 1 (log 0); padding rows get 0 too (they are
    masked separately)."""
    B = valid.shape[0]
    counts = token_sizes(total_map, valid)
    sizes = torch.cat([counts.new_ones(B, prefix), counts], 1) if prefix else counts
    return sizes.clamp_min(1).log()


def proportional_sdpa(q: Tensor, k: Tensor, v: Tensor, log_sizes: Tensor, attn_mask=None,
                      dropout_p: float = 0.0, is_causal: bool = False, *, scale=None,
                      enable_gqa: bool = False, valid=None, prefix: int = 0) -> Tensor:
    """``scaled_dot_product_attention`` with ``log(size_j)`` added to every logit of key j: as
    a float mask on the CPU, folded into one extra q/k channel elsewhere (see the module
    docstring). With ``valid`` (and ``prefix``): the padded batch's attention of
    ``mpm_fx.ops.varlen.varlen_sdpa``, each image on its own keys."""
    if q.device.type == "cpu" and valid is None and not is_causal:
        bias = per_key(log_sizes, k).to(q.dtype)  # (*L, 1, T)
        if attn_mask is not None:
            bias = (torch.where(attn_mask, bias, float("-inf")) if attn_mask.dtype == torch.bool
                    else attn_mask + bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                              scale=scale, enable_gqa=enable_gqa)
    return folded_sdpa(q, k, v, log_sizes, attn_mask, dropout_p, is_causal, scale=scale,
                       enable_gqa=enable_gqa, valid=valid, prefix=prefix)


def folded_sdpa(q: Tensor, k: Tensor, v: Tensor, log_sizes: Tensor, attn_mask=None,
                dropout_p: float = 0.0, is_causal: bool = False, *, scale=None,
                enable_gqa: bool = False, valid=None, prefix: int = 0) -> Tensor:
    """``proportional_sdpa`` with the bias folded into one extra q/k channel, so that no float
    mask is needed (the form for flash kernels that take none)."""
    E, Ev = q.shape[-1], v.shape[-1]
    scale = E ** -0.5 if scale is None else scale
    width = -(-(max(E, Ev) + 1) // FLASH_MULTIPLE) * FLASH_MULTIPLE  # E + 1, padded
    bias = (per_key(log_sizes, k).transpose(-2, -1) / scale).to(k.dtype)  # (*L, T, 1)
    q2 = torch.cat([q, torch.ones_like(q[..., :1]), q.new_zeros(*q.shape[:-1], width - E - 1)], -1)
    k2 = torch.cat([k, bias, k.new_zeros(*k.shape[:-1], width - E - 1)], -1)
    v2 = torch.cat([v, v.new_zeros(*v.shape[:-1], width - Ev)], -1)
    if valid is not None:
        from mpm_fx.ops.varlen import varlen_sdpa

        out = varlen_sdpa(q2, k2, v2, attn_mask, dropout_p, is_causal, valid=valid, prefix=prefix,
                          scale=scale, enable_gqa=enable_gqa)
    else:
        out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=attn_mask,
                                             dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
    return out[..., :Ev]


def add_log_sizes(scores: Tensor, log_sizes: Tensor) -> Tensor:
    """Explicit-softmax attention: logits (*L, Tq, T) + log(size) of each key."""
    return scores + per_key(log_sizes, scores).to(scores.dtype)
