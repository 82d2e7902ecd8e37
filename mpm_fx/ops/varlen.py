"""Attention over a padded batch without a padding mask (option ``attention="varlen"``).

After a merge the images of a batch hold different counts; the merge pads them to the largest
and every later attention must not read the padded keys. The masked path passes a key mask to
``scaled_dot_product_attention``, which sends it off the FlashAttention kernel on a GPU. Here
each image's attention reads only its own ``P + M_b`` keys instead, with no mask:

- on CUDA, through ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention over sequences of
  given lengths) where that kernel exists and takes the call (half precision, no bias of the
  model's own): with ``seqused_k`` (newer torch) each image's key count is given and the padded
  layout is kept; without it (torch 2.11) the images' rows are packed into one sequence of
  cumulative lengths and unpacked after, padded query rows left 0 (nothing reads them: a
  merge never maps a token to padding, reconstruction never gathers one);
- everywhere else, one SDPA call per image on its own keys (what the CUDA kernel computes, and
  the reference the tests hold the masked path to).

Apart from that packed case, every query row is computed, padded ones too (they read the
image's valid keys, like the masked path), so the result equals the masked path's on every row. The op is a ``torch.library`` custom
op (``mpm_fx::varlen_attention``): compilers see one opaque call of known output shape. It is
not available to an AOTInductor ``.pt2`` (which must run without mpm_fx) or inside TensorRT
engines: those entry points keep the masked path.

Shapes: B batch, H heads, L = P + M query and key rows (prefix and padded merged tokens),
E head dim, Ev value dim.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["varlen_sdpa", "varlen_attention", "cuda_kernel_available"]


def cuda_kernel_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen.varlen_attn``."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _takes_key_counts() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "seqused_k" in inspect.signature(varlen_attn).parameters


@torch.library.custom_op("mpm_fx::varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, bias: Tensor | None,
                     scale: float) -> Tensor:
    """(B, H, L, E) q, k, v; lengths (B,) the keys each image reads (the first lengths[b]);
    bias: None, or the model's own additive float mask broadcastable to (B, H, L, L)."""
    return _each_image(q, k, v, lengths, bias, scale)


@varlen_attention.register_fake
def _(q, k, v, lengths, bias, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@varlen_attention.register_kernel("cuda")
def _cuda_kernel(q, k, v, lengths, bias, scale):
    if bias is not None or q.dtype not in (torch.float16, torch.bfloat16) \
            or not cuda_kernel_available():
        return _each_image(q, k, v, lengths, bias, scale)
    from torch.nn.attention.varlen import varlen_attn

    B, H, L, E = q.shape
    rows = [t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[-1]) for t in (q, k, v)]
    if _takes_key_counts():  # the padded layout as it is: B sequences of L, keys counted
        starts = torch.arange(0, (B + 1) * L, L, device=q.device, dtype=torch.int32)
        out = varlen_attn(*rows, starts, starts, L, L, scale=scale,
                          seqused_k=lengths.to(torch.int32))
    else:  # pack each image's first lengths[b] rows, run, unpack (padded rows stay 0)
        keep = (torch.arange(L, device=q.device)[None, :] < lengths[:, None]).flatten()
        index = keep.nonzero().squeeze(1)
        starts = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        packed = varlen_attn(*(t.index_select(0, index) for t in rows), starts, starts, L, L,
                             scale=scale)
        out = packed.new_zeros(B * L, H, v.shape[-1]).index_copy_(0, index, packed)
    return out.reshape(B, L, H, v.shape[-1]).transpose(1, 2).contiguous()


def _each_image(q, k, v, lengths, bias, scale):
    B, H, L, _ = q.shape
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    if bias is not None:
        bias = bias.expand(B, H, L, k.shape[-2])
    for b, n in enumerate(lengths.tolist()):
        mask = None if bias is None else bias[b:b + 1, :, :, :n]
        out[b:b + 1] = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n],
                                                      v[b:b + 1, :, :n], attn_mask=mask,
                                                      scale=scale)
    return out


def varlen_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p: float = 0.0,
                is_causal: bool = False, *, valid: Tensor, prefix: int = 0, scale=None,
                enable_gqa: bool = False) -> Tensor:
    """``scaled_dot_product_attention`` on a padded batch whose keys past each image's ``prefix
    + valid[b].sum()`` are padding (valid: (B, M) bool, True first): each image reads its own
    keys and no mask is built. Falls back to the masked call where the per-image op does not
    apply (not (B, H, L, E), a boolean mask, dropout, causal, grouped heads)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    plain = (query.dim() == 4 and key.dim() == 4 and not dropout_p and not is_causal
             and not enable_gqa and (attn_mask is None or attn_mask.is_floating_point()))
    if not plain:
        from mpm_fx.ops.masks import key_mask, mask_keys

        mask = (key_mask(valid, key, prefix=prefix) if attn_mask is None
                else mask_keys(attn_mask, valid, prefix=prefix))
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                              dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    lengths = valid.sum(1) + prefix
    bias = None if attn_mask is None else attn_mask.to(query.dtype)
    return varlen_attention(query, key, value, lengths, bias, float(scale))
