"""Output the encoder (option ``encoder_outputs``, for fidelity views): the last block's output
rebuilt to the full (B, P + N0, D) grid, then the composed (B, N0) map after each merge, as
more graph outputs. The tokens a decoder would see, from the program itself.

    before:  return (y,)
    after:   return (y, reconstruct(x_L, total_map), total_map_1, total_map_2, ...)
"""

from __future__ import annotations

from torch import fx

from mpm_fx import ops
from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import insert

__all__ = ["output_encoder"]


def output_encoder(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Append the rebuilt encoder output and the maps (if ``ctx.encoder_outputs``)."""
    if not ctx.encoder_outputs:
        return gm
    output = gm.graph.output_node()
    last = ctx.analysis.stream[-1]
    tokens = last
    if ctx.merges.points:
        tokens = insert(gm.graph, "reconstruct", ops.reconstruct,
                        (last, ctx.merges.points[-1].total_map),
                        {"prefix": ctx.analysis.prefix_tokens}, before=output)
        tokens.meta["val"] = last.meta["val"]
    maps = tuple(p.total_map for p in ctx.merges.points)
    output.args = (tuple(output.args[0]) + (tokens,) + maps,)
    return gm
