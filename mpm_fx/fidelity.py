"""How close a merged model's output stays to the unmerged one's.

``compare(reference, merged)`` takes two segmentation outputs of shape (B, C, H, W):
- C == 1: probabilities (e.g. saliency); masks are ``p > threshold``;
- C > 1: class scores; the predicted class is the argmax over C.
It returns the mean absolute error of the raw outputs, the pixel agreement of the masks (or
classes) and their IoU (C == 1: of the foreground; C > 1: mean over the classes present in
either prediction), each averaged over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compare"]


def compare(reference: Tensor, merged: Tensor, *, threshold: float = 0.5) -> dict:
    if reference.shape != merged.shape or reference.dim() != 4:
        raise ValueError(f"compare needs two (B, C, H, W) outputs of one shape, got "
                         f"{tuple(reference.shape)} and {tuple(merged.shape)}")
    reference, merged = reference.detach().double(), merged.detach().double()
    mae = (reference - merged).abs().mean().item()
    if reference.shape[1] == 1:
        a, b = reference[:, 0] > threshold, merged[:, 0] > threshold
        union = (a | b).flatten(1).sum(1)
        iou = torch.where(union > 0, (a & b).flatten(1).sum(1) / union.clamp(min=1), 1.0)
    else:
        a, b = reference.argmax(1), merged.argmax(1)
        C = reference.shape[1]
        ious = []
        for image_a, image_b in zip(a, b):
            classes = torch.cat([image_a.flatten(), image_b.flatten()]).unique()
            per_class = [((image_a == c) & (image_b == c)).sum() / ((image_a == c) | (image_b == c)).sum()
                         for c in classes if 0 <= c < C]
            ious.append(torch.stack(per_class).mean())
        iou = torch.stack(ious)
    agreement = (a == b).flatten(1).double().mean(1)
    return {"mae": mae, "pixel_agreement": agreement.mean().item(), "iou": iou.mean().item()}
