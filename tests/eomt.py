"""EoMT ("Your ViT is secretly an image segmentation model", CVPR 2025) from HF transformers, at a
small random-init config, as a test model: a DINOv2-style encoder whose last
blocks also carry learned query tokens, concatenated in front of the stream, from which masks
and classes are read. Random weights: no fidelity claim can be made from it.

    mpm-bench --models eomt:segmenter --sizes 128 --schedules "2,4"  # with tests/ on the path
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["model", "segmenter", "SemanticEoMT"]


def model(size: int = 128, *, layers: int = 8, query_blocks: int = 2, registers: int = 4,
          queries: int = 10, classes: int = 5, seed: int = 0) -> nn.Module:
    """``transformers.EomtForUniversalSegmentation``, random init, eval mode, mask annealing
    off (``attn_mask_probs`` 0, as after training): patch 16, width 96, 3 heads."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.EomtConfig(hidden_size=96, num_hidden_layers=layers,
                                     num_attention_heads=3, intermediate_size=384,
                                     image_size=size, patch_size=16,
                                     num_register_tokens=registers, num_blocks=query_blocks,
                                     num_queries=queries, num_labels=classes)
    eomt = transformers.EomtForUniversalSegmentation(config).eval()
    eomt.attn_mask_probs.zero_()
    return eomt


class SemanticEoMT(nn.Module):
    """EoMT's semantic segmentation as one tensor: class probabilities (without "no object")
    times mask probabilities, summed over queries, at the input size: (B, classes, H, W), the
    computation of ``EomtImageProcessor.post_process_semantic_segmentation``."""

    def __init__(self, eomt: nn.Module):
        super().__init__()
        self.eomt = eomt

    def forward(self, pixel_values):
        out = self.eomt(pixel_values)
        masks = F.interpolate(out.masks_queries_logits, size=pixel_values.shape[-2:],
                              mode="bilinear", align_corners=False)
        classes = out.class_queries_logits.softmax(-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", classes, masks.sigmoid())


def segmenter(size: int = 128) -> nn.Module:
    """``mpm-bench --models eomt:segmenter``: the small EoMT as a segmenter."""
    return SemanticEoMT(model(size)).eval()
