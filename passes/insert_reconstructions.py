"""Insert reconstructions: one gather before every decoder tap that reads merged tokens.

A tap at depth j reads the stream between blocks j-1 and j; the tokens there went through every
merge before block j, so the gather uses the map composed up to that merge and gives back the
full (B, P + N0, D) grid, prefix tokens in front. The decoder then runs unchanged.

    before:  y = norm(x_L)
    after:   full = reconstruct(x_L, total_map, prefix=P);  y = norm(full)
"""

from __future__ import annotations

from torch import fx

from mpm_fx import ops
from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import insert

__all__ = ["insert_reconstructions"]


def insert_reconstructions(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """A gather in front of every tap after the first merge."""
    done = 0
    for tap in ctx.analysis.taps:
        merge = ctx.merges.last_before(tap.depth)
        if merge is None:
            continue  # this tap reads tokens before the first merge
        stream = ctx.analysis.stream[tap.depth]
        full = insert(gm.graph, "reconstruct", ops.reconstruct, (stream, merge.total_map),
                      {"prefix": ctx.analysis.prefix_tokens}, after=stream)
        full.meta["val"] = stream.meta["val"]
        stream.replace_all_uses_with(full, delete_user_cb=tap.users.__contains__)
        done += 1
    ctx.stats["reconstructed_taps"] = done
    return gm
