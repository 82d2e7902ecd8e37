"""Segmenter (Strudel et al., ICCV 2021): a ViT encoder and a mask-transformer or linear decoder.

Written after the authors' code (github.com/rstrudel/segmenter) with the same module names, so
its checkpoints' keys map one-to-one: ``encoder.{patch_embed.proj, cls_token, dist_token,
pos_embed, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm}`` and
``decoder.{head}`` (linear) or ``decoder.{cls_emb, proj_dec, blocks.i.*, decoder_norm,
proj_patch, proj_classes, mask_norm}`` (mask transformer). Attention is an explicit
``softmax(q kᵀ) v`` as in the original, or ``scaled_dot_product_attention`` (``attention="sdpa"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Segmenter", "VisionTransformer", "MaskTransformer", "DecoderLinear", "Block",
           "Attention", "segmenter"]

# (embed dim, depth, heads) of the Segmenter ViT sizes.
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
         "large": (1024, 24, 16)}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str = "softmax"):
        super().__init__()
        self.heads, self.scale, self.attention = heads, (dim // heads) ** -0.5, attention
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, attention: str = "softmax"):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attention)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    def __init__(self, patch_size: int, dim: int, channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch_size, stride=patch_size)

    def forward(self, im):
        return self.proj(im).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Segmenter's encoder: returns the normed tokens (B, P + N, D), P = 1 (+1 if distilled)."""

    def __init__(self, image_size, patch_size, n_layers, d_model, n_heads, d_ff=None,
                 distilled=False, attention="softmax", channels=3):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbedding(patch_size, d_model, channels)
        grid = (image_size[0] // patch_size) * (image_size[1] // patch_size)
        self.distilled = distilled
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.randn(1, grid + 1 + distilled, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model, attention)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, im):
        x = self.patch_embed(im)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.distilled:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class DecoderLinear(nn.Module):
    def __init__(self, n_cls: int, patch_size: int, d_encoder: int):
        super().__init__()
        self.patch_size = patch_size
        self.head = nn.Linear(d_encoder, n_cls)

    def forward(self, x, im_size):
        H, W = im_size
        x = self.head(x)  # (B, N, classes)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H // self.patch_size, W // self.patch_size)


class MaskTransformer(nn.Module):
    """Class embeddings join the patch tokens for a few transformer blocks; masks are the scalar
    products of normalised patch and class features."""

    def __init__(self, n_cls, patch_size, d_encoder, n_layers, n_heads, d_model, d_ff,
                 attention="softmax"):
        super().__init__()
        self.patch_size, self.n_cls, self.scale = patch_size, n_cls, d_model ** -0.5
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, attention)
                                    for _ in range(n_layers))
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model) * 0.02)
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

    def forward(self, x, im_size):
        H, W = im_size
        x = self.proj_dec(x)
        x = torch.cat((x, self.cls_emb.expand(x.shape[0], -1, -1)), 1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, cls_seg_feat = x[:, :-self.n_cls], x[:, -self.n_cls:]
        patches = patches @ self.proj_patch
        cls_seg_feat = cls_seg_feat @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ cls_seg_feat.transpose(1, 2))  # (B, N, classes)
        return masks.transpose(1, 2).reshape(x.shape[0], self.n_cls, H // self.patch_size,
                                             W // self.patch_size)


class Segmenter(nn.Module):
    """Image (B, 3, H, W) -> class logits (B, classes, H, W)."""

    def __init__(self, encoder: VisionTransformer, decoder: nn.Module, n_cls: int):
        super().__init__()
        self.n_cls, self.patch_size = n_cls, encoder.patch_size
        self.encoder, self.decoder = encoder, decoder

    def forward(self, im):
        H, W = im.shape[2:]
        x = self.encoder(im)
        x = x[:, 1 + self.encoder.distilled:]  # drop CLS (and distillation) tokens
        masks = self.decoder(x, (H, W))
        return F.interpolate(masks, size=(H, W), mode="bilinear")


def segmenter(size: str = "tiny", *, decoder: str = "mask", n_cls: int = 150,
              image_size: int = 512, patch_size: int = 16, attention: str = "softmax",
              n_layers: int | None = None, decoder_layers: int = 2) -> Segmenter:
    """A randomly initialised Segmenter (``size`` in tiny/small/base/large, ``decoder`` in
    mask/linear); load a checkpoint into it for real use."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if decoder not in ("mask", "linear"):
        raise ValueError(f"decoder must be 'mask' or 'linear', got {decoder!r}")
    dim, depth, heads = SIZES[size]
    encoder = VisionTransformer((image_size, image_size), patch_size, n_layers or depth, dim,
                                heads, attention=attention)
    if decoder == "linear":
        head = DecoderLinear(n_cls, patch_size, dim)
    else:
        head = MaskTransformer(n_cls, patch_size, dim, decoder_layers, dim // 64, dim, 4 * dim,
                               attention)
    return Segmenter(encoder, head, n_cls)
