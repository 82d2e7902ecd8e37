"""FX helpers that the analysis and the passes share: node order and dependence, module paths,
captured shapes, running a graph up to some nodes, attention arguments, and the mark every node
the pipeline inserts carries. Nothing here knows about MPM."""

from __future__ import annotations

import torch
from torch import fx

from mpm_fx.ops import size_aware, varlen

__all__ = ["NodeOrder", "module_path", "captured_shape", "shape_of", "values_of", "SDPA",
           "is_sdpa", "sdpa_args", "set_sdpa_mask", "MARK", "insert", "marked"]

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# The positional parameters of the SDPA-like targets (size-aware attention keeps its node and
# changes its target to the folded version, which takes the log sizes after the value).
_SDPA_PARAMS = {
    SDPA: ("query", "key", "value", "attn_mask", "dropout_p", "is_causal"),
    size_aware.proportional_sdpa: ("query", "key", "value", "log_sizes", "attn_mask",
                                   "dropout_p", "is_causal"),
    varlen.varlen_sdpa: ("query", "key", "value", "attn_mask", "dropout_p", "is_causal"),
}
MARK = "mpm_fx"  # node.meta key: the role of a node the pipeline inserted ("merge", ...)


class NodeOrder:
    """Topological positions and ancestor sets (as int bitsets) of a graph's nodes, as they are
    when it is built: nodes inserted later are not in it."""

    def __init__(self, graph: fx.Graph):
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self._anc: dict = {}
        for n in self.nodes:
            bits = 1 << self.index[n]
            for p in n.all_input_nodes:
                bits |= self._anc[p]
            self._anc[n] = bits

    def depends(self, node: fx.Node, on: fx.Node) -> bool:
        """True if ``node`` is ``on`` or computed from it."""
        return bool(self._anc[node] >> self.index[on] & 1)

    def between(self, first: fx.Node, last: fx.Node) -> frozenset:
        """Nodes computed from ``first`` that ``last`` needs, ``last`` included, ``first`` not."""
        i, j = self.index[first], self.index[last]
        return frozenset(n for n in self.nodes[i + 1:j + 1]
                         if self.depends(n, first) and self.depends(last, n))


def module_path(node: fx.Node) -> str:
    """The path of the innermost module that computed ``node``; for an op of the top-level
    forward (no submodule), the node's own name, e.g. "mean (top level)"."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path or f"{node.name} (top level)"


def captured_shape(node):
    """Shape of a node's value at capture (its ``meta["val"]``); None for non-tensors."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def shape_of(node) -> tuple:
    """``captured_shape``, with () for non-tensors."""
    return captured_shape(node) or ()


class _Stop(Exception):
    pass


def values_of(gm: fx.GraphModule, flat_inputs: list, wanted) -> dict:
    """Run the graph on real inputs and return the values of the ``wanted`` nodes, stopping as
    soon as the last of them is computed."""
    wanted, values = set(wanted), {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted:
                values[n] = value
                if len(values) == len(wanted):
                    raise _Stop
            return value

    try:
        with torch.no_grad():
            Record(gm).run(*flat_inputs)
    except _Stop:
        pass
    return values


def is_sdpa(node: fx.Node) -> bool:
    """A scaled_dot_product_attention node (or its size-aware form)."""
    return node.op == "call_function" and node.target in _SDPA_PARAMS


def sdpa_args(node: fx.Node) -> dict:
    """The arguments of an SDPA-like node by name (query, key, value, attn_mask, ...); absent
    optional ones are missing."""
    return {**dict(zip(_SDPA_PARAMS[node.target], node.args)), **node.kwargs}


def set_sdpa_mask(node: fx.Node, mask) -> None:
    """Set (or, with None, clear) the ``attn_mask`` of an SDPA-like node."""
    position = _SDPA_PARAMS[node.target].index("attn_mask")
    if len(node.args) > position:
        node.args = node.args[:position] + (mask,) + node.args[position + 1:]
    else:
        node.kwargs = {**node.kwargs, "attn_mask": mask}


def insert(graph: fx.Graph, role: str, target, args: tuple, kwargs: dict | None = None, *,
           after: fx.Node | None = None, before: fx.Node | None = None) -> fx.Node:
    """A call_function node inserted after (or before) a node, marked with its ``role`` in
    ``node.meta[MARK]`` (backends find the pipeline's nodes by it)."""
    with graph.inserting_after(after) if after is not None else graph.inserting_before(before):
        node = graph.call_function(target, args, kwargs or {})
    node.meta[MARK] = role
    return node


def marked(graph: fx.Graph) -> list:
    """(node, role) for every node the pipeline inserted, in graph order."""
    return [(n, n.meta[MARK]) for n in graph.nodes if MARK in n.meta]
