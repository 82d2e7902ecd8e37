"""Capture: trace a model into one flat ATen-level FX graph at the shapes of its example inputs.

We capture with ``torch.export(strict=False)``: it runs the model's own Python once, so any
``nn.Module`` that runs eagerly without data-dependent Python control flow traces, keeps
``scaled_dot_product_attention``, ``linear`` and ``layer_norm`` as single nodes (what the analysis
reads), records the module path of every node, and leaves parameters as ``get_attr`` nodes that
point at the model's own ``nn.Parameter`` objects. Shapes are static; after a merge the token count
is made symbolic again by ``passes.follow_token_count``. Dynamo would also give an FX graph, but
at the Torch-function level (``F.linear``, methods) and with guards we would have to manage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from mpm_fx.errors import CaptureError

__all__ = ["Captured", "capture", "dynamo_image_inputs"]


@dataclass
class Captured:
    """A traced model: ``gm`` takes and returns flat lists of leaves; the specs rebuild them."""

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec


def capture(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    try:
        exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # the exporter raises many types; all mean "cannot trace"
        raise CaptureError(
            f"torch.export(strict=False) could not trace {type(model).__name__}: "
            f"{type(e).__name__}: {_first_line(e)}. mpm_fx needs a forward without data-dependent "
            "Python control flow on tensor values; check that the model runs with these "
            "example inputs and that torch.export.export(model, args, strict=False) works."
        ) from e
    gm = exported.module()
    in_spec, out_spec = gm._in_spec, gm._out_spec
    gm.graph._codegen = fx.graph.CodeGen()  # flat leaves in, flat leaves out: we own the specs
    gm._forward_pre_hooks.clear()  # export's check of (args, kwargs) against in_spec: ours now
    gm.recompile()
    return Captured(gm, in_spec, out_spec)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def dynamo_image_inputs(gm: fx.GraphModule):
    """Positions of the user's own inputs among the placeholders of a graph from dynamo, which
    also passes the model's parameters and buffers as inputs (sources under ``L['self']``).
    None when the graph does not come from dynamo."""
    positions = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        arg = node.meta.get("grapharg")
        if arg is None or getattr(arg, "source", None) is None:
            return None
        if not arg.source.name.startswith("L['self']"):
            positions.append(i)
    return positions
