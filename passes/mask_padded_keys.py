"""Mask padded keys: with a batch, every attention after a merge ignores padding rows.
(Methods that merge every image to one count, ``Merging.pads`` False, make no padding: their
attentions stay unmasked, and SDPA keeps its flash kernel.)

Images of one batch merge to different counts; the merge pads them to the largest and returns a
``valid`` mask. Every later attention gets that mask on its keys (SPEC step 8), so each image's
output equals its batch-of-one output. SDPA takes it as a boolean ``attn_mask`` (or, when it
already has the model's own bias, that bias with -inf on padded keys); an explicit softmax gets
its logits for padded keys set to -inf. Batch 1 has no padding and no mask. It runs after
``follow_token_count``, so that a bias it combines is already gathered for the merged tokens.
With ``attention="varlen"``, SDPA nodes are left to ``attend_per_image`` (each image on its own
keys, no mask); explicit softmaxes are masked here either way.

    before:  sdpa(q, k, v)                    softmax(s)
    after:   sdpa(q, k, v, key_mask(valid))   softmax(mask_scores(s, valid))
"""

from __future__ import annotations

from torch import fx

from mpm_fx import ops
from mpm_fx.errors import UnsupportedGraph
from mpm_fx.passes.attend_per_image import padded_attentions, uses_varlen
from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import insert, is_sdpa, sdpa_args, set_sdpa_mask

__all__ = ["mask_padded_keys"]


def mask_padded_keys(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Padding masks on every attention that runs on merged tokens (batch > 1 only)."""
    if ctx.analysis.batch == 1:
        return gm
    prefix, order, masked = ctx.analysis.prefix_tokens, ctx.analysis.order, 0
    per_image = uses_varlen(ctx)
    for block, merge in padded_attentions(ctx):
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
            if per_image:  # no mask: attend_per_image gives each image its own keys
                continue
            if own is None:
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

