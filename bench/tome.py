"""ToMe, the token-reduction method users reach for first, as a comparison for ``mpm-bench``.

Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023), bipartite soft matching, written
here from the paper's algorithm (not part of the library):

1. the image tokens (prefix tokens are protected) are split alternately into sets A and B;
2. every A token finds its most similar B token (cosine similarity);
3. the r A tokens with the most similar partners are merged into them: a size-weighted average,
   sizes (how many patches a token stands for) add up;
4. later attentions add log(size) to their logits (proportional attention), so a merged token
   weighs as the patches it stands for;
5. for the dense head every original token reads the token it ended in (the "unmerge"), as MPM's
   reconstruction does.

It runs at the same places as the MPM schedule it is compared with, before those blocks, on the
block's input tokens (the paper merges inside the block on the attention keys; a merge before
the block keeps the two methods on the same tokens and block count), with ``r`` chosen so that
the token count after every merge is the MPM schedule's mean over the photos. Every image keeps
the same count, so batches need no padding. Written for ``FocusSegmenter`` (a timm ViT backbone
and a conv decoder), the model of the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ToMeSegmenter", "bipartite_merge"]


def bipartite_merge(tokens: Tensor, size: Tensor, source: Tensor, r: int, prefix: int) -> tuple:
    """One ToMe merge of ``r`` image tokens.

    tokens (B, P + N, D), size (B, P + N, 1) patches per token, source (B, N0): the index of
    every original image token among the N current ones. Returns the three after the merge, with
    N - r image tokens: the A tokens left unmerged, then the B tokens (the paper's order)."""
    head, x = tokens[:, :prefix], tokens[:, prefix:]
    head_size, s = size[:, :prefix], size[:, prefix:]
    B, N, D = x.shape
    unit = F.normalize(x.float(), dim=-1)
    a, b = unit[:, ::2], unit[:, 1::2]
    best, partner = (a @ b.transpose(1, 2)).max(-1)  # (B, Na): each A token's nearest B token
    order = best.argsort(-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # the r most similar A tokens go
    into = partner.gather(1, merged)
    weighted = x * s
    xa, xb, sa, sb = weighted[:, ::2], weighted[:, 1::2], s[:, ::2], s[:, 1::2]
    rows = lambda t, i: t.gather(1, i.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    xb = xb.scatter_reduce(1, into.unsqueeze(-1).expand(-1, -1, D), rows(xa, merged), "sum")
    sb = sb.scatter_reduce(1, into.unsqueeze(-1), rows(sa, merged), "sum")
    new_size = torch.cat([rows(sa, kept), sb], 1)
    new_x = (torch.cat([rows(xa, kept), xb], 1) / new_size).to(tokens.dtype)
    # where every current token went: kept A tokens in their order, merged ones into their B token
    left = kept.shape[1]
    a_to = torch.empty_like(best, dtype=torch.long)
    a_to.scatter_(1, kept, torch.arange(left, device=x.device).expand(B, left))
    a_to.scatter_(1, merged, left + into)
    to = torch.empty(B, N, dtype=torch.long, device=x.device)
    to[:, ::2] = a_to
    to[:, 1::2] = left + torch.arange(N // 2, device=x.device)
    return (torch.cat([head, new_x], 1), torch.cat([head_size, new_size], 1),
            to.gather(1, source))


class ToMeSegmenter(nn.Module):
    """``FocusSegmenter`` with ToMe before ``schedule``, down to ``counts`` image tokens."""

    def __init__(self, model: nn.Module, schedule, counts):
        super().__init__()
        if len(schedule) != len(counts):
            raise ValueError(f"one token count per merge: {tuple(schedule)} and {tuple(counts)}")
        self.model, self.merges = model, dict(zip(schedule, (int(round(c)) for c in counts)))

    def encode(self, x: Tensor) -> Tensor:
        """The last block's output, every original token reading the token it ended in:
        (B, P + N0, D), as ``mpm_fx.fidelity.encoder_tokens`` gives it for MPM."""
        vit = self.model.backbone
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        P, B = vit.num_prefix_tokens, tokens.shape[0]
        N0 = tokens.shape[1] - P
        size = torch.ones(B, tokens.shape[1], 1, dtype=torch.float32, device=x.device)
        source = torch.arange(N0, device=x.device).expand(B, N0)
        bias = None
        for k, block in enumerate(vit.blocks):
            if k in self.merges:
                r = tokens.shape[1] - P - self.merges[k]
                tokens, size, source = bipartite_merge(tokens, size, source, r, P)
                bias = size.log().to(tokens.dtype)[:, None, None, :, 0]  # proportional attention
            tokens = block(tokens, attn_mask=bias) if bias is not None else block(tokens)
        image = tokens[:, P:].gather(1, source.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return torch.cat([tokens[:, :P], image], 1)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        vit, P = self.model.backbone, self.model.backbone.num_prefix_tokens
        patches = vit.norm(self.encode(x))[:, P:]  # per-token norm: before or after the unmerge
        grid = patches.transpose(1, 2).reshape(B, patches.shape[-1], H // 14, W // 14)
        logits = F.interpolate(self.model.decoder(grid), size=(H, W), mode="bilinear",
                               align_corners=False)
        return logits.sigmoid()
