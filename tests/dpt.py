"""A ViT with explicit softmax attention and a DPT-like decoder that reads four encoder blocks.

DPT (Ranftl et al. 2021) "reassembles" the tokens of several intermediate blocks into image-like
feature maps at different scales and fuses them coarse to fine. This small version keeps that
structure: the decoder taps the outputs of blocks ``taps`` (default the last of each quarter),
drops the prefix tokens, projects each to a grid, resamples it to its scale and fuses them with
residual conv units. It exists to test multi-tap reconstruction; it is not a trained model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpm_fx.bench.models.segmenter import Block, PatchEmbedding

__all__ = ["DPTSegmenter"]


class Fuse(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, skip=None):
        if skip is not None:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + skip
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class DPTSegmenter(nn.Module):
    def __init__(self, image_size=224, patch_size=16, dim=192, depth=12, heads=3,
                 prefix_tokens=1, taps=(2, 5, 8, 11), channels=64, n_cls=21):
        super().__init__()
        self.patch_size, self.taps, self.prefix_tokens = patch_size, tuple(taps), prefix_tokens
        self.patch_embed = PatchEmbedding(patch_size, dim)
        grid = (image_size // patch_size) ** 2
        self.prefix = nn.Parameter(torch.randn(1, prefix_tokens, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, prefix_tokens + grid, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, 4 * dim, "softmax") for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in taps)
        self.project = nn.ModuleList(nn.Conv2d(dim, channels, 1) for _ in taps)
        self.fuse = nn.ModuleList(Fuse(channels) for _ in taps)
        self.head = nn.Conv2d(channels, n_cls, 1)

    def forward(self, im):
        B, _, H, W = im.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = torch.cat([self.prefix.expand(B, -1, -1), self.patch_embed(im)], 1) + self.pos_embed
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                features.append(x)
        maps = []
        for level, (f, norm, proj) in enumerate(zip(features, self.norms, self.project)):
            f = norm(f)[:, self.prefix_tokens:].transpose(1, 2).reshape(B, -1, h, w)
            scale = 2.0 ** (1 - level)  # 2x, 1x, 1/2x, 1/4x of the patch grid
            maps.append(F.interpolate(proj(f), scale_factor=scale, mode="bilinear",
                                      align_corners=False))
        x = self.fuse[-1](maps[-1])
        for fuse, skip in zip(reversed(self.fuse[:-1]), reversed(maps[:-1])):
            x = fuse(x, skip)
        return F.interpolate(self.head(x), size=(H, W), mode="bilinear", align_corners=False)
