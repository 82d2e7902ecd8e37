"""Output the token counts (option ``token_counts``, on for ``mpm_fx.optimize``): one more graph
output, a (merges, B) int64 tensor of each image's image tokens after each merge, read by
``mpm_report``.

    before:  return (y,)
    after:   return (y, stack([sum(valid_1, 1), sum(valid_2, 1), ...]))
"""

from __future__ import annotations

import torch
from torch import fx

from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import insert

__all__ = ["output_token_counts"]

aten = torch.ops.aten


def output_token_counts(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Append the (merges, B) token counts to the outputs (if ``ctx.token_counts``)."""
    if not ctx.token_counts:
        return gm
    graph = gm.graph
    output = graph.output_node()
    if ctx.merges.points:
        sums = [insert(graph, "token_counts", aten.sum.dim_IntList, (p.valid, [1]), before=output)
                for p in ctx.merges.points]
        counts = insert(graph, "token_counts", aten.stack.default, (sums,), before=output)
    else:
        counts = insert(graph, "token_counts", aten.new_zeros.default,
                        (ctx.analysis.stream[0], [0, ctx.analysis.batch]),
                        {"dtype": torch.long}, before=output)
    output.args = (tuple(output.args[0]) + (counts,),)
    return gm
