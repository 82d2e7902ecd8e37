"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023),
as a merge method of mpm_fx (the contract of ``mpm_fx.methods``).

One merge of ``r`` image tokens, step by step as the paper states it:

1. **Sets.** The image tokens (the prefix is protected) are split alternately: A = tokens
   0, 2, 4, ..., B = tokens 1, 3, 5, ... in their current order.
2. **Edges.** Every A token finds its most similar B token: the cosine of the metric (the
   attention keys averaged over heads where ToMe merges, between attention and MLP).
3. **Choice.** The r A tokens whose edges are the most similar merge into their B tokens; a B
   token may absorb several.
4. **Means.** Each merged token is the mean of its group weighted by size (how many patches a
   token stands for; sizes add up), so that it stays the mean of its patches.

Proportional attention (``log(size)`` on the logits of later attentions) is the pass's
size-aware attention, on by default for this method. The output holds the A tokens left, in
their order, then the B tokens in theirs (r = 0 returns the tokens as they are): ``M = N - r``
for every image, so a batch needs no padding and every shape after the merge is static.

**mpm_fx**, where the paper is silent (as for MPM, docs/SPEC.md):

- scores are compared rounded to ``mpm_fx.ops.QUANTUM``, ties going to the smallest index (an A
  token's partner: the first B token at its best score; the choice: A tokens by score, then by
  index), so that the tokens merged do not depend on the machine's GEMM;
- a token whose metric is not all finite is never a partner, and an A token with no finite
  partner ranks last: it merges (into B token 0) only when r needs more edges than the finite
  tokens offer;
- a group of one token is copied exactly; half-precision means are summed in float32.

Shapes: B batch, P prefix tokens, N image tokens in (Na = ceil(N/2) in A, Nb = floor(N/2) in B),
M = N - r out, D channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mpm_fx.ops.groups import merge_counted
from mpm_fx.ops.similarity import QUANTUM
from mpm_fx.ops.tokens import MergeResult

__all__ = ["merge", "SUMMARY", "COUNTED", "PLACEMENT", "SIZE_AWARE", "OPTIONS"]

SUMMARY = "bipartite soft matching (ToMe, Bolya et al., ICLR 2023)"
COUNTED = True  # takes r, the image tokens each merge removes
PLACEMENT = "after_attention"
SIZE_AWARE = True  # proportional attention, as the paper
OPTIONS = {"weighted": True}  # size-weighted means, as the paper


def merge(x: Tensor, valid: Tensor | None = None, *, prefix: int = 0, sizes: Tensor | None = None,
          metric: Tensor | None = None, r: int, weighted: bool = True) -> MergeResult:
    """One ToMe merge of ``r`` image tokens of ``x`` (B, P + N, D), as ``mpm_fx.methods``'
    contract says (``weighted``: size-weighted means, the paper's; the module docstring)."""
    return merge_counted("tome", _groups, x, valid, prefix, sizes, metric, r, weighted)


def _groups(u: Tensor, pairable: Tensor, r: int) -> Tensor:
    """Steps 1-3: the group of every image token, (B, N) in [0, N - r): the A tokens left, in
    their order, then the B tokens in theirs."""
    B, N = pairable.shape
    a, b = u[:, ::2], u[:, 1::2]  # (B, Na, E), (B, Nb, E)
    Na, Nb = a.shape[1], b.shape[1]
    partner, best = _best_partners(a, b, pairable[:, 1::2])
    lowest = -(1 << 41)  # below every real score and every "no partner" (-2**40)
    has_partner = pairable[:, ::2] & (best > -(1 << 40))
    partner = torch.where(has_partner, partner, 0)
    best = torch.where(has_partner, best, lowest)
    # the choice: scores, then indices (a strict order, so topk has no ties to break)
    rank = best * Na + (Na - 1 - torch.arange(Na, device=u.device))
    merged = rank.topk(r, dim=-1).indices  # (B, r)
    kept = rank.topk(Na - r, dim=-1, largest=False).indices.sort(-1).values  # (B, Na - r), in order
    left = Na - r
    a_to = torch.empty(B, Na, dtype=torch.long, device=u.device)
    a_to = a_to.scatter(1, kept, torch.arange(left, device=u.device).expand(B, left))
    a_to = a_to.scatter(1, merged, left + partner.gather(1, merged))
    b_to = left + torch.arange(Nb, device=u.device).expand(B, Nb)
    return _interleave(a_to, b_to, N)


def _best_partners(a: Tensor, b: Tensor, pairable_b: Tensor) -> tuple[Tensor, Tensor]:
    """Each A token's partner, the first B token at its best rounded score, and that score
    (int64; -2**40 where no B token is pairable). One similarity (B, Na, Nb), read twice: its
    maxima, then the first j whose rounded score reaches the rounded maximum (``quantize`` is
    monotone, so the rounded maximum is the maximum of the rounded scores). Under Inductor
    each read is one vectorised loop; nothing N x N is converted to integers."""
    s = torch.bmm(a, b.transpose(1, 2))  # (B, Na, Nb)
    s = torch.where(pairable_b[:, None, :], s, float("-inf"))
    best = torch.floor(s.amax(-1) / QUANTUM + 0.5)  # (B, Na), -inf where no partner
    j = torch.arange(s.shape[-1], device=s.device).to(s.dtype)  # exact below 2**24 tokens
    at = torch.floor(s / QUANTUM + 0.5) >= best.unsqueeze(-1)
    partner = torch.where(at, j, float(s.shape[-1])).amin(-1).long()
    none = ~torch.isfinite(best)
    return torch.where(none, 0, partner), torch.where(none, -(2.0 ** 40), best).long()


def _interleave(even: Tensor, odd: Tensor, N: int) -> Tensor:
    """(B, ceil(N/2)) and (B, floor(N/2)) -> (B, N) with even[k] at 2k and odd[k] at 2k + 1."""
    if odd.shape[1] < even.shape[1]:
        odd = torch.cat([odd, odd.new_zeros(odd.shape[0], 1)], 1)
    return torch.stack([even, odd], -1).flatten(1)[:, :N]
