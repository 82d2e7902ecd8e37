"""Drop attention masks and score biases that do nothing, before any merge changes the tokens.

Some models hand every attention a mask built from the token count even when nothing is masked
(HF transformers builds an all-True (1, 1, T, T) mask, or adds an all-zero bias to the scores).
Every tensor indexed by token position that a merged block reads (``analysis.position_tensors``)
is checked: a constant made while tracing (derived from no input, parameter or buffer) is
evaluated once and dropped if it is a no-op (an all-True boolean mask, or an all-zero additive
bias), which is cheaper than following the merges. A table of the model (a relative-position
bias or a rotary table, computed from parameters or buffers: zero at initialisation does not
make it a no-op, as the weights can be loaded later) and any other constant is kept:
``follow_token_count`` gathers it by the merged tokens' leaders. A tensor computed from the
images (an attention mask of the user's) is refused: which positions a merged token should see
in it is the user's to say.
"""

from __future__ import annotations

import torch
from torch import fx

from mpm_fx.errors import UnsupportedGraph
from mpm_fx.passes.analysis import derived_from_state, merge_room, position_tensors
from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import is_sdpa, module_path, sdpa_args, set_sdpa_mask, shape_of, values_of

__all__ = ["drop_noop_masks"]

aten = torch.ops.aten


def drop_noop_masks(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Drop no-op masks read by merged blocks; refuse position-indexed tensors from the images."""
    if not ctx.merges_anything:
        return gm
    encoder, order = ctx.analysis, ctx.analysis.order
    found = position_tensors(encoder)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]  # (dynamo: + parameters)
    constants, refused = [], []
    for block in encoder.blocks[min(ctx.schedule):]:
        for reader, tensor in found.get(block.index, []):
            if any(order.depends(tensor, p) for p in encoder.images):
                refused.append((reader, tensor))
            elif not (any(order.depends(tensor, p) for p in placeholders)
                      or derived_from_state(gm, order, tensor)):
                constants.append((reader, tensor))
    values = values_of(gm, ctx.inputs, {t for _, t in constants}) if constants else {}
    dropped = []
    for reader, tensor in constants:
        value = values[tensor]
        other = reader.args[1] if reader.args[0] is tensor else reader.args[0]
        if is_sdpa(reader) and sdpa_args(reader).get("attn_mask") is tensor and _is_noop_mask(
                value):
            dropped.append((reader, None))
        elif (reader.target is aten.add.Tensor and _is_zero(value)
              and shape_of(reader) == shape_of(other)):
            dropped.append((reader, other))
    if refused:
        _refuse(gm, order, encoder, found, *refused[0])
    for reader, other in dropped:
        if is_sdpa(reader):
            set_sdpa_mask(reader, None)
        else:
            reader.replace_all_uses_with(other)
            gm.graph.erase_node(reader)
    gm.graph.eliminate_dead_code()
    ctx.stats["dropped_masks"] = len(dropped)
    return gm


def _refuse(gm, order, encoder, found, reader, tensor) -> None:
    kind = "a table multiplied into q or k" if reader.target is aten.mul.Tensor else "a mask"
    where = merge_room(sorted(found), len(encoder.blocks), "read such tensors")
    raise UnsupportedGraph(
        f"{module_path(reader)} ({reader.name}) reads {tensor.name}, a tensor of shape "
        f"{shape_of(tensor)} indexed by token position and computed from the inputs ({kind}). "
        "mpm_fx gathers the model's own position tables (rotary, relative-position biases) "
        "for merged tokens, but which positions a merged token should see in a mask of the "
        f"user's is not its to guess; make the mask a constant of the model, or {where}.")


def _is_noop_mask(value: torch.Tensor) -> bool:
    return bool(value.all()) if value.dtype == torch.bool else _is_zero(value)


def _is_zero(value: torch.Tensor) -> bool:
    return value.dtype != torch.bool and bool((value == 0).all())
