"""Insert merges: one call of the merge method's op at each scheduled block, composing the maps.

Where it goes is the method's placement. ``before_block`` (MPM's): on the block's input
stream; the merged tokens replace it for every node of the block, and uses of the same stream
node outside the block (a decoder tap at this depth) keep reading the unmerged tokens.
``after_attention`` (ToMe's): on ``h = x + attention(x)``, with the attention's keys averaged
over heads as the similarity metric; the merged tokens replace ``h`` for the rest of the block
(its MLP), so the block's attention still runs on the tokens before the merge. ``before_block``
with ``metric="keys"``: on the block's input, with the keys the block would compute from it as
the metric (its input norm run once more, and the key rows of its projection: every head side
by side), so that the attention itself runs on the merged tokens.

Each merge after the first takes the previous merge's ``valid`` mask (methods that pad), the
sizes of its tokens (methods that weigh by size, from the composed map), the composed map and
the patch grid (methods that read where tokens are), and its map is composed
with the earlier ones, so one (B, N0) map per depth is kept however many merges ran (SPEC).
Which op and options are the method's (``ctx.method``); nothing here depends on which it is.

    before_block:     r = merge(x_k, valid_{k-1}, prefix=P, **options);  t = r[0];
                      h = t + attn(norm(t)) ...
      metric="keys":  m = projected_keys(norm(x_k), W_qkv, b_qkv, start=D, stop=2D);
                      r = merge(x_k, valid_{k-1}, prefix=P, metric=m, ...) ...
    after_attention:  h = x_k + attn(norm(x_k));  m = key_metric(keys_k, h);
                      r = merge(h, prefix=P, sizes=token_sizes(total_{k-1}), metric=m, r=...);
                      t = r[0];  y = t + mlp(norm(t))
"""

from __future__ import annotations

import operator

from torch import fx

from mpm_fx import ops
from mpm_fx.errors import UnsupportedGraph
from mpm_fx.passes.analysis import Block, attention_keys, key_projection
from mpm_fx.passes.context import MergePoint, PassContext
from mpm_fx.passes.graph import MARK, insert

__all__ = ["insert_merges"]


def _keys_before(graph: fx.Graph, block: Block) -> fx.Node:
    """The keys of a block's attention computed from its (unmerged) input, after it: the
    block's input norm copied, then the key rows of its projection."""
    projection = key_projection(block)
    last = _hoist(graph, block, [projection.weight, projection.bias] + [
        a for n in projection.norm for a in n.all_input_nodes
        if a not in projection.norm and a is not block.input])
    copies = {}
    for node in projection.norm:
        with graph.inserting_after(last):
            last = graph.node_copy(node, lambda a: copies.get(a, a))
        last.meta[MARK] = "metric"
        copies[node] = last
    return insert(graph, "metric", ops.projected_keys, (last, projection.weight, projection.bias),
                  {"start": projection.start, "stop": projection.stop}, after=last)


def _hoist(graph: fx.Graph, block: Block, needed: list) -> fx.Node:
    """Move what the copied key path reads from outside the block (a bias the attention builds
    from its parameters, e.g. BEiT's q/v bias) to just after the block's input, with whatever
    it is computed from, so that the metric and the merge can stand before the block; returns
    the last node moved (the block's input if none)."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    start, todo, late = position[block.input], [n for n in needed if n is not None], set()
    while todo:
        n = todo.pop()
        if n in late or position[n] < start:
            continue
        if n in block.body or n is block.input:
            raise UnsupportedGraph(f"{block.name}: its key projection reads {n.name}, which the "
                                   "block computes from its input, so metric='keys' cannot run "
                                   "it before the block; use placement='after_attention'")
        late.add(n)
        todo.extend(n.all_input_nodes)
    anchor = block.input
    for n in sorted(late, key=position.__getitem__):
        anchor.append(n)
        anchor = n
    return anchor


def insert_merges(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """A merge at each scheduled block; ``ctx.merges`` records their nodes."""
    if not ctx.merges_anything:
        return gm
    graph, prefix, method = gm.graph, ctx.analysis.prefix_tokens, ctx.method
    N0 = ctx.analysis.image_tokens
    counts = [N0] + [n or N0 for n in method.counts(N0, len(ctx.schedule))[:-1]]
    for i, k in enumerate(ctx.schedule):
        block = ctx.analysis.blocks[k]
        earlier = ctx.merges.points[-1] if ctx.merges.points else None
        if method.placement == "before_block":
            stream, metric, replaced = block.input, None, block.body.__contains__
            if method.metric == "keys":
                metric = _keys_before(graph, block)
        else:
            stream = block.middle
            keys, transposed = attention_keys(block)
            metric = insert(graph, "metric", ops.key_metric, (keys, stream),
                            {"transposed": transposed}, after=stream)
            after = block.body - ctx.analysis.order.between(block.input, stream)
            replaced = after.__contains__  # the block's nodes after h (its MLP and last add)
        last = metric or stream
        sizes = None
        if method.uses_sizes and earlier is not None:
            sizes = insert(graph, "sizes", ops.token_sizes, (earlier.total_map, earlier.valid),
                           after=last)
            last = sizes
        valid = earlier.valid if earlier is not None and earlier.padded else None
        options = {"prefix": prefix, **method.kwargs(
            i, total_map=earlier.total_map if earlier is not None else None,
            patch_grid=ctx.analysis.grid)}
        if sizes is not None:
            options["sizes"] = sizes
        if metric is not None:
            options["metric"] = metric
        result = insert(graph, "merge", method.op, (stream, valid), options, after=last)
        tokens = insert(graph, "merge", operator.getitem, (result, 0), after=result)
        merge_map = insert(graph, "merge", operator.getitem, (result, 1), after=tokens)
        valid = insert(graph, "merge", operator.getitem, (result, 2), after=merge_map)
        total = merge_map
        if earlier is not None:
            total = insert(graph, "compose", ops.compose, (earlier.total_map, merge_map),
                           after=valid)
        # Shape the tokens would have had unmerged: follow_token_count compares against it.
        tokens.meta["val"] = stream.meta["val"]
        stream.replace_all_uses_with(tokens, delete_user_cb=replaced)
        bounds = method.bounds(counts[i], i, whole=i == 0)
        ctx.merges.points.append(MergePoint(k, tokens, merge_map, valid, total, method.placement,
                                            method.pads, bounds))
    ctx.stats["merges"] = len(ctx.merges.points)
    return gm
