"""Size-aware attention (option ``size_aware=True``): every attention after a merge adds
``log(size_j)`` of each key to its logits, sizes being how many original patches a token
stands for (``mpm_fx.ops.size_aware``). An SDPA node is edited in place into
``size_aware.proportional_sdpa`` (the bias folded into one extra q/k channel, so the flash
kernel still runs; the node stays the one the analysis found); an explicit softmax gets the bias
added to its logits. The default (off) is the paper's plain MPM.

    before:  sdpa(q, k, v, mask)
    after:   proportional_sdpa(q, k, v, log_token_sizes(total_map, valid), mask)
"""

from __future__ import annotations

from torch import fx

from mpm_fx.ops import size_aware
from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import insert, is_sdpa, sdpa_args

__all__ = ["size_aware_attention"]


def size_aware_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """log(token size) on the logits of every attention after a merge (if ``ctx.size_aware``)."""
    if not ctx.size_aware:
        return gm
    graph, prefix = gm.graph, ctx.analysis.prefix_tokens
    log_sizes = {}
    for point in ctx.merges.points:
        log_sizes[point] = insert(graph, "log_sizes", size_aware.log_token_sizes,
                                  (point.total_map, point.valid), {"prefix": prefix},
                                  after=point.last)
    changed = 0
    for block in ctx.analysis.blocks:
        point = ctx.merges.in_block(block.index)
        if point is None:
            continue
        attention = block.attention
        if is_sdpa(attention):
            args = sdpa_args(attention)
            q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
            attention.target = size_aware.proportional_sdpa
            attention.args, attention.kwargs = (q, k, v, log_sizes[point]), args
        else:
            scores = insert(graph, "log_sizes", size_aware.add_log_sizes,
                            (attention.args[0], log_sizes[point]), before=attention)
            scores.meta = {**attention.args[0].meta, **scores.meta}
            attention.args = (scores,) + attention.args[1:]
        changed += 1
    ctx.stats["size_aware_attentions"] = changed
    return gm
