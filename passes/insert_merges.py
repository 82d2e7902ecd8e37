"""Insert merges: one ``mpm_fx.ops.merge`` before each scheduled block, composing the maps.

The merged tokens replace the block input for every node of that block; uses of the same stream
node outside the block (a decoder tap at this depth) keep reading the unmerged tokens. Each merge
after the first takes the previous merge's ``valid`` mask, and its map is composed with the
earlier ones, so one (B, N0) map per depth is kept however many merges ran (SPEC).

    before:  x_k = block_{k-1}(...);  h = x_k + attn(norm(x_k)) ...
    after:   r = merge(x_k, valid_{k-1}, prefix=P);  t = r[0];  h = t + attn(norm(t)) ...
"""

from __future__ import annotations

import operator

from torch import fx

from mpm_fx import ops
from mpm_fx.passes.context import MergePoint, Rewrite
from mpm_fx.passes.graph import insert

__all__ = ["insert_merges"]


def insert_merges(gm: fx.GraphModule, ctx: Rewrite) -> fx.GraphModule:
    """A merge before each scheduled block; ``ctx.merges`` records their nodes."""
    if not ctx.merging:
        return gm
    graph, prefix = gm.graph, ctx.analysis.prefix_tokens
    for k in ctx.schedule:
        block = ctx.analysis.blocks[k]
        stream = block.input
        earlier = ctx.merges.points[-1] if ctx.merges.points else None
        result = insert(graph, "merge", ops.merge, (stream, earlier.valid if earlier else None),
                        {"prefix": prefix}, after=stream)
        tokens = insert(graph, "merge", operator.getitem, (result, 0), after=result)
        merge_map = insert(graph, "merge", operator.getitem, (result, 1), after=tokens)
        valid = insert(graph, "merge", operator.getitem, (result, 2), after=merge_map)
        total = merge_map
        if earlier is not None:
            total = insert(graph, "compose", ops.compose, (earlier.total_map, merge_map),
                           after=valid)
        # Shape the tokens would have had unmerged: follow_token_count compares against it.
        tokens.meta["val"] = stream.meta["val"]
        stream.replace_all_uses_with(tokens, delete_user_cb=block.body.__contains__)
        ctx.merges.points.append(MergePoint(k, tokens, merge_map, valid, total))
    ctx.stats["merges"] = len(ctx.merges.points)
    return gm
