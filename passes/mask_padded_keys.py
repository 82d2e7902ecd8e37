"""Mask padded keys: with a batch, every attention after a merge ignores padding rows.
(Methods that merge every image to one count, ``Merging.pads`` False, make no padding: their
attentions stay unmasked, and SDPA keeps its flash kernel.)

Images of one batch merge to different counts; the merge pads them to the largest and returns a
``valid`` mask. Every later attention gets that mask on its keys (SPEC step 8), so each image's
output equals its batch-of-one output. SDPA takes it as a boolean ``attn_mask`` (or, when it
already has the model's own bias, that bias with -inf on padded keys); an explicit softmax gets
its logits for padded keys set to -inf. Batch 1 has no padding and no mask. It runs after
``follow_token_count``, so that a bias it combines is already gathered for the merged tokens.

    before:  sdpa(q, k, v)                    softmax(s)
    after:   sdpa(q, k, v, key_mask(valid))   softmax(mask_scores(s, valid))

With ``attention="varlen"`` (the method's option; "auto" chooses it when the images are on a
CUDA device whose torch has the varlen kernel), an SDPA node keeps no mask: its target becomes
``mpm_fx.varlen.varlen_sdpa`` with the merge's ``valid``, each image attending to its own keys
(FlashAttention over the images' lengths on CUDA). The model's own bias stays its attn_mask.

    after (varlen):  varlen_sdpa(q, k, v, valid=valid, prefix=P)
"""

from __future__ import annotations

from torch import fx

from mpm_fx import ops, varlen
from mpm_fx.errors import UnsupportedGraph
from mpm_fx.passes.context import Rewrite
from mpm_fx.passes.graph import SDPA, insert, is_sdpa, sdpa_args, set_sdpa_mask

__all__ = ["mask_padded_keys"]


def mask_padded_keys(gm: fx.GraphModule, ctx: Rewrite) -> fx.GraphModule:
    """Padding masks on every attention that runs on merged tokens (batch > 1 only)."""
    if ctx.analysis.batch == 1:
        return gm
    prefix, order, masked = ctx.analysis.prefix_tokens, ctx.analysis.order, 0
    per_image = uses_varlen(ctx)
    for block in ctx.analysis.blocks:
        merge = ctx.merges.in_block(block.index)
        if merge is None or not merge.padded:
            continue  # before any merge, or after merges that keep one count (no padding)
        attention = block.attention
        if is_sdpa(attention):
            own = sdpa_args(attention).get("attn_mask")
            # (a table gathered by follow_token_count is a new node, and never from the images:
            # the probe refuses those)
            if own is not None and own in order.index and any(
                    order.depends(own, p) for p in ctx.analysis.images):
                raise UnsupportedGraph(
                    f"{block.name} already has an attention mask that depends on the input; "
                    "mpm_fx cannot combine it with the padding mask of a batch. Run batches of "
                    "one image, or schedule merges after this block.")
            if per_image and attention.target is SDPA:  # no mask: each image on its own keys
                attention.target = varlen.varlen_sdpa
                attention.kwargs = {**attention.kwargs, "valid": merge.valid, "prefix": prefix}
                ctx.stats["varlen_attentions"] += 1
            elif own is None:
                set_sdpa_mask(attention, insert(gm.graph, "key_mask", ops.key_mask,
                                                (merge.valid, sdpa_args(attention)["key"]),
                                                {"prefix": prefix}, before=attention))
            else:  # the model's own bias (gathered for merged tokens): padded keys to -inf
                set_sdpa_mask(attention, insert(gm.graph, "key_mask", ops.mask_keys,
                                                (own, merge.valid), {"prefix": prefix},
                                                before=attention))
        else:
            scores = insert(gm.graph, "mask_scores", ops.mask_scores,
                            (attention.args[0], merge.valid), {"prefix": prefix},
                            before=attention)
            attention.args = (scores,) + attention.args[1:]
        masked += 1
    ctx.stats["masked_attentions"] = masked
    return gm


def uses_varlen(ctx: Rewrite) -> bool:
    """Whether padded batches attend per image (``attention`` option of the method): "varlen",
    or "auto" with the images on a CUDA device and the varlen kernel in this torch."""
    choice = ctx.method.attention
    if choice != "auto":
        return choice == "varlen"
    devices = {getattr(n.meta.get("val"), "device", None) for n in ctx.analysis.images}
    return any(d is not None and d.type == "cuda" for d in devices) and \
        varlen.cuda_kernel_available()
