"""Insert reconstructions: one gather before every decoder tap that reads merged tokens.

A tap at depth j reads the stream between blocks j-1 and j; the tokens there went through every
merge before block j, so the gather uses the map composed up to that merge and gives back the
full (B, P + N0, D) grid, prefix tokens in front. The decoder then runs unchanged.
"""

from __future__ import annotations

from torch import fx

from mpm_fx import ops
from mpm_fx.passes.analysis import Encoder
from mpm_fx.passes.insert_merges import Merges

__all__ = ["insert_reconstructions"]


def insert_reconstructions(gm: fx.GraphModule, encoder: Encoder, merges: Merges) -> tuple:
    """Returns the depths of the taps that got a gather."""
    gathered = []
    for tap in encoder.taps:
        merge = merges.last_before(tap.depth)
        if merge is None:
            continue  # this tap reads tokens before the first merge
        stream = encoder.stream[tap.depth]
        with gm.graph.inserting_after(stream):
            full = gm.graph.call_function(ops.reconstruct, (stream, merge.total_map),
                                          {"prefix": encoder.prefix_tokens})
        full.meta["val"] = stream.meta["val"]
        stream.replace_all_uses_with(full, delete_user_cb=tap.users.__contains__)
        gathered.append(tap.depth)
    return tuple(gathered)
