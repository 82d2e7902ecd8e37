"""Drop attention masks and score biases that do nothing, before any merge changes the tokens.

Some models hand every attention a mask built from the token count even when nothing is masked
(HF transformers builds an all-True (1, 1, T, T) mask, or adds an all-zero bias to the scores).
Such a tensor cannot follow a merge: it is sized for the original tokens. Every tensor indexed
by token position that a merged block reads (``analysis.position_tensors``) is therefore
checked: a constant made while tracing (derived from no input, parameter or buffer) is evaluated
once, and dropped if it is a no-op (an all-True boolean mask, or an all-zero additive bias).
Anything else is a real dependence on token positions that merging would break, and is reported:
a relative-position bias or a rotary table (from parameters or buffers: zero at initialisation
does not make it a constant, as the weights can be loaded later), or a mask from the inputs.
"""

from __future__ import annotations

import torch
from torch import fx

from mpm_fx.errors import UnsupportedGraph
from mpm_fx.passes.analysis import derived_from_state, merge_room, position_tensors
from mpm_fx.passes.context import Rewrite
from mpm_fx.passes.graph import is_sdpa, module_path, sdpa_args, set_sdpa_mask, shape_of, values_of

__all__ = ["drop_noop_masks"]

aten = torch.ops.aten


def drop_noop_masks(gm: fx.GraphModule, ctx: Rewrite) -> fx.GraphModule:
    """Drop no-op masks read by merged blocks; refuse any other position-indexed tensor."""
    if not ctx.merging:
        return gm
    encoder, order = ctx.analysis, ctx.analysis.order
    found = position_tensors(encoder)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants, refused = [], []
    for block in encoder.blocks[min(ctx.schedule):]:
        for reader, tensor in found.get(block.index, []):
            if any(order.depends(tensor, p) for p in placeholders) or derived_from_state(
                    gm, order, tensor):
                refused.append((reader, tensor))
            else:
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
        else:
            refused.append((reader, tensor))
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
    state = derived_from_state(gm, order, tensor)
    inputs = any(order.depends(tensor, p) for p in gm.graph.nodes if p.op == "placeholder")
    if reader.target is aten.mul.Tensor:
        kind = "a rotary position embedding: a cos/sin table multiplied into q or k"
    elif is_sdpa(reader) or reader.target is aten.add.Tensor:
        kind = "a relative-position bias or an attention mask"
    else:
        kind = "a table indexed by token position"
    source = (f"computed from {', '.join(state[:3])}{', ...' if len(state) > 3 else ''}" if state
              else "computed from the inputs" if inputs else "a constant that is not a no-op")
    where = merge_room(sorted(found), len(encoder.blocks), "read such tensors")
    raise UnsupportedGraph(
        f"{module_path(reader)} ({reader.name}) reads {tensor.name}, a tensor of shape "
        f"{shape_of(tensor)} indexed by token position ({kind}; {source}). A merged token "
        "stands for several positions, so mpm_fx cannot merge before a block that reads one "
        f"(position-aware merging is not supported yet); {where}.")


def _is_noop_mask(value: torch.Tensor) -> bool:
    return bool(value.all()) if value.dtype == torch.bool else _is_zero(value)


def _is_zero(value: torch.Tensor) -> bool:
    return value.dtype != torch.bool and bool((value == 0).all())
