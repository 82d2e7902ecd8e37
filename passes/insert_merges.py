"""Insert merges: one ``mpm_fx.ops.merge`` before each scheduled block, composing the maps.

The merged tokens replace the block input for every node of that block; uses of the same stream
node outside the block (a decoder tap at this depth) keep reading the unmerged tokens. Each merge
after the first takes the previous merge's ``valid`` mask, and its map is composed with the
earlier ones, so one (B, N0) map per depth is kept however many merges ran (SPEC).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx

from mpm_fx import ops
from mpm_fx.passes.analysis import Encoder

__all__ = ["MergePoint", "Merges", "insert_merges"]


@dataclass(frozen=True)
class MergePoint:
    block: int  # merges before this encoder block
    tokens: fx.Node  # (B, P + M, D)
    merge_map: fx.Node  # (B, N_before)
    valid: fx.Node  # (B, M)
    total_map: fx.Node  # (B, N0): composed with every earlier merge


@dataclass
class Merges:
    points: list = field(default_factory=list)

    def last_before(self, depth: int):
        """The last merge whose tokens the stream carries at ``depth`` (merge block < depth)."""
        done = [p for p in self.points if p.block < depth]
        return done[-1] if done else None

    def in_block(self, block: int):
        """The last merge whose tokens block ``block`` runs on (merge block <= block)."""
        return self.last_before(block + 1)


def insert_merges(gm: fx.GraphModule, encoder: Encoder, schedule: tuple) -> Merges:
    graph, merges = gm.graph, Merges()
    prefix = encoder.prefix_tokens
    for k in sorted(schedule):
        block = encoder.blocks[k]
        stream = block.input
        earlier = merges.points[-1] if merges.points else None
        with graph.inserting_after(stream):
            result = graph.call_function(ops.merge, (stream, earlier.valid if earlier else None),
                                         {"prefix": prefix})
        with graph.inserting_after(result):
            tokens = graph.call_function(operator.getitem, (result, 0))
        with graph.inserting_after(tokens):
            merge_map = graph.call_function(operator.getitem, (result, 1))
        with graph.inserting_after(merge_map):
            valid = graph.call_function(operator.getitem, (result, 2))
        total = merge_map
        if earlier is not None:
            with graph.inserting_after(valid):
                total = graph.call_function(ops.compose, (earlier.total_map, merge_map))
        # Shape the tokens would have had unmerged: follow_token_count compares against it.
        tokens.meta["val"] = stream.meta["val"]
        stream.replace_all_uses_with(tokens, delete_user_cb=block.body.__contains__)
        merges.points.append(MergePoint(k, tokens, merge_map, valid, total))
    return merges
