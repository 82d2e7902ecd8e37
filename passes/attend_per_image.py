"""Attend per image: with ``attention="varlen"`` (the method's option; "auto" chooses it when the
images are on a CUDA device whose torch has the varlen kernel), every SDPA after a merge that
pads runs each image of the batch on its own keys instead of taking a padding mask
(``mpm_fx.ops.varlen.varlen_sdpa``: FlashAttention over the images' lengths on CUDA, one SDPA
per image elsewhere). The model's own bias stays its attn_mask. An explicit softmax has no such
form: ``mask_padded_keys`` masks it. Batch 1 has no padding and nothing changes.

    before:  sdpa(q, k, v)                      proportional_sdpa(q, k, v, log_sizes)
    after:   varlen_sdpa(q, k, v, valid=valid,  proportional_sdpa(q, k, v, log_sizes,
                         prefix=P)                                valid=valid, prefix=P)

Either attention form may come first (``size_aware_attention`` turns SDPA into
``proportional_sdpa``, keeping the node's keyword arguments): the order of the two passes does
not matter.
"""

from __future__ import annotations

from torch import fx

from mpm_fx.ops import varlen
from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import SDPA, is_sdpa

__all__ = ["attend_per_image", "uses_varlen", "padded_attentions"]


def attend_per_image(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Each image on its own keys in every SDPA after a padding merge (if ``uses_varlen``)."""
    if ctx.analysis.batch == 1 or not uses_varlen(ctx):
        return gm
    for block, merge in padded_attentions(ctx):
        attention = block.attention
        if not is_sdpa(attention):
            continue  # an explicit softmax: mask_padded_keys masks its logits
        if attention.target is SDPA:
            attention.target = varlen.varlen_sdpa
        attention.kwargs = {**attention.kwargs, "valid": merge.valid,
                            "prefix": ctx.analysis.prefix_tokens}
        ctx.stats["varlen_attentions"] += 1
    return gm


def padded_attentions(ctx: PassContext) -> list:
    """(block, the merge whose tokens its attention runs on) for every block whose attention
    runs after a merge that pads (methods that keep one count make no padding)."""
    found = []
    for block in ctx.analysis.blocks:
        merge = ctx.merges.in_block(block.index)
        if merge is not None and merge.padded:
            found.append((block, merge))
    return found


def uses_varlen(ctx: PassContext) -> bool:
    """Whether padded batches attend per image (``attention`` option of the method): "varlen",
    or "auto" with the images on a CUDA device and the varlen kernel in this torch."""
    choice = ctx.method.attention
    if choice != "auto":
        return choice == "varlen"
    devices = {getattr(n.meta.get("val"), "device", None) for n in ctx.analysis.images}
    return any(d is not None and d.type == "cuda" for d in devices) and \
        varlen.cuda_kernel_available()
