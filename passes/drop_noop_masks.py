"""Drop attention masks and score biases that do nothing, before any merge changes the tokens.

Some models hand every attention a mask built from the token count even when nothing is masked
(HF transformers builds an all-True (1, 1, T, T) mask, or adds an all-zero bias to the scores).
Such a tensor cannot follow a merge: it is sized for the original tokens. A token-sized tensor
that does not depend on the model's inputs and is read inside a merged block is therefore
evaluated once: if it is a no-op (an all-True boolean mask, or an all-zero additive bias) its use
is removed; anything else (e.g. a relative-position bias) is a real dependence on token
positions that merging would break, and is reported.
"""

from __future__ import annotations

import torch
from torch import fx

from mpm_fx.errors import UnsupportedGraph
from mpm_fx.passes.analysis import (SDPA, Encoder, NodeOrder, module_path, sdpa_mask, shape_of,
                                   values_of)
from mpm_fx.passes.mask_padded_keys import set_sdpa_mask

__all__ = ["drop_noop_masks"]

aten = torch.ops.aten
# Ops whose non-token operands are weights, never token-indexed.
_WEIGHT_READERS = {aten.linear.default, aten.layer_norm.default, aten.conv1d.default,
                   aten.conv2d.default}


def drop_noop_masks(gm: fx.GraphModule, encoder: Encoder, order: NodeOrder, first_block: int,
                    flat_inputs: list) -> int:
    """Remove no-op masks read by blocks ``first_block`` onwards; returns how many were removed."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    suspects = {}  # reader -> the constant it reads
    for block in encoder.blocks[first_block:]:
        for reader in block.body:
            for arg in reader.all_input_nodes:
                if (arg not in block.body and arg is not block.input
                        and reader.target not in _WEIGHT_READERS
                        and _token_sized(arg, encoder.tokens)
                        and not any(order.depends(arg, p) for p in placeholders)):
                    suspects[reader] = arg
    if not suspects:
        return 0
    values = values_of(gm, flat_inputs, set(suspects.values()))
    for reader, const in suspects.items():
        value = values[const]
        if reader.target is SDPA and sdpa_mask(reader) is const and _is_noop_mask(value):
            set_sdpa_mask(reader, None)
        elif reader.target is aten.add.Tensor and _is_zero(value) and shape_of(reader) == shape_of(
                reader.args[1] if reader.args[0] is const else reader.args[0]):
            reader.replace_all_uses_with(reader.args[1] if reader.args[0] is const else reader.args[0])
            gm.graph.erase_node(reader)
        else:
            raise UnsupportedGraph(
                f"{module_path(reader)} ({reader.name}) reads {const.name}, a tensor of shape "
                f"{shape_of(const)} sized for the original {encoder.tokens} tokens that is not a "
                "no-op mask (e.g. a relative-position bias or a real attention mask). Merged "
                "tokens have no single position, so this block cannot run after a merge: "
                "schedule merges only after it.")
    gm.graph.eliminate_dead_code()
    return len(suspects)


def _token_sized(node: fx.Node, tokens: int) -> bool:
    return tokens in shape_of(node)


def _is_noop_mask(value: torch.Tensor) -> bool:
    return bool(value.all()) if value.dtype == torch.bool else _is_zero(value)


def _is_zero(value: torch.Tensor) -> bool:
    return value.dtype != torch.bool and bool((value == 0).all())
