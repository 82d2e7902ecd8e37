"""Mask padded keys: with a batch, every attention after a merge ignores padding rows.

Images of one batch merge to different counts; the merge pads them to the largest and returns a
``valid`` mask. Every later attention gets that mask on its keys (SPEC step 8), so each image's
output equals its batch-of-one output. SDPA takes it as a boolean ``attn_mask``; an explicit
softmax gets its logits for padded keys set to -inf. Batch 1 has no padding and no mask.
"""

from __future__ import annotations

from torch import fx

from mpm_fx import ops
from mpm_fx.errors import UnsupportedGraph
from mpm_fx.passes.analysis import SDPA, Encoder, sdpa_mask
from mpm_fx.passes.insert_merges import Merges

__all__ = ["mask_padded_keys", "set_sdpa_mask"]


def mask_padded_keys(gm: fx.GraphModule, encoder: Encoder, merges: Merges) -> int:
    """Returns the number of attentions masked (0 at batch 1)."""
    if encoder.batch == 1:
        return 0
    masked = 0
    prefix = encoder.prefix_tokens
    for block in encoder.blocks:
        merge = merges.in_block(block.index)
        if merge is None:
            continue
        attention = block.attention
        if attention.target is SDPA and sdpa_mask(attention) is not None:
            raise UnsupportedGraph(
                f"{block.name} already has an attention mask that depends on the input; mpm_fx "
                "cannot combine it with the padding mask of a batch. Run batches of one image, "
                "or schedule merges after this block.")
        with gm.graph.inserting_before(attention):
            if attention.target is SDPA:
                mask = gm.graph.call_function(ops.key_mask, (merge.valid, attention.args[1]),
                                              {"prefix": prefix})
                set_sdpa_mask(attention, mask)
            else:
                scores = gm.graph.call_function(ops.mask_scores,
                                                (attention.args[0], merge.valid),
                                                {"prefix": prefix})
                attention.args = (scores,) + attention.args[1:]
        masked += 1
    return masked


def set_sdpa_mask(sdpa: fx.Node, mask) -> None:
    """Set (or, with None, clear) the ``attn_mask`` of a scaled_dot_product_attention node."""
    if len(sdpa.args) > 3:
        sdpa.args = sdpa.args[:3] + (mask,) + sdpa.args[4:]
    else:
        sdpa.kwargs = {**sdpa.kwargs, "attn_mask": mask}
