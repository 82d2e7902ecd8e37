"""How attentions after a merge skip a batch's padding rows (SPEC step 8): key masks for SDPA,
-inf logits for an explicit softmax, and the model's own bias combined with both.

Plain tensor code, torch only. Shapes: B batch, P prefix tokens, M merged tokens, T = P + M
keys, L the leading dims of attention tensors with the batch first (batch-major, e.g. (B, H) or
(B * H,)).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["key_mask", "per_key", "mask_scores", "mask_keys"]


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
