"""Size-aware attention (option ``size_aware=True``): every attention after a merge adds
``log(size_j)`` of each key to its logits, sizes being how many original patches a token
stands for. SDPA nodes become ``mpm_fx.size_aware.proportional_sdpa`` (the bias folded into one
extra q/k channel, so the flash kernel still runs); an explicit softmax gets the bias added to
its logits. The default (off) is the paper's plain MPM.
"""

from __future__ import annotations

from torch import fx

from mpm_fx import size_aware
from mpm_fx.passes.analysis import SDPA, Encoder
from mpm_fx.passes.insert_merges import Merges

__all__ = ["size_aware_attention"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def size_aware_attention(gm: fx.GraphModule, encoder: Encoder, merges: Merges) -> int:
    """Returns the number of attentions made size-aware."""
    graph, prefix = gm.graph, encoder.prefix_tokens
    log_sizes = {}
    for point in merges.points:
        anchor = point.total_map if point.total_map is not point.merge_map else point.valid
        with graph.inserting_after(anchor):
            log_sizes[point] = graph.call_function(size_aware.log_token_sizes,
                                                   (point.total_map, point.valid),
                                                   {"prefix": prefix})
    changed = 0
    for block in encoder.blocks:
        point = merges.in_block(block.index)
        if point is None:
            continue
        attention = block.attention
        if attention.target is SDPA:
            bound = dict(zip(_SDPA_ARGS, attention.args), **attention.kwargs)
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            with graph.inserting_before(attention):
                folded = graph.call_function(size_aware.proportional_sdpa,
                                             (q, k, v, log_sizes[point]), bound)
            folded.meta = dict(attention.meta)
            attention.replace_all_uses_with(folded)
            graph.erase_node(attention)
        else:
            with graph.inserting_before(attention):
                scores = graph.call_function(size_aware.add_log_sizes,
                                             (attention.args[0], log_sizes[point]))
            scores.meta = dict(attention.args[0].meta)
            attention.args = (scores,) + attention.args[1:]
        changed += 1
    return changed
