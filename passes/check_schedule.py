"""Check the schedule against the encoder found, before anything changes.

Every index must be a block of the encoder, a counted method's r must be within what it can
remove where it merges (at most half the tokens each merge receives), and no value computed inside a block that will run
on merged tokens may be read outside it (attention weights returned to the caller, say): after a
merge such a value has fewer tokens and no reconstruction.
"""

from __future__ import annotations

from torch import fx

from mpm_fx.errors import ScheduleError, UnsupportedGraph
from mpm_fx.passes.analysis import describe_encoder, leaks
from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import module_path

__all__ = ["check_schedule"]


def check_schedule(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Schedule indices in range; no in-block value of a merged block read outside it."""
    blocks = ctx.analysis.blocks
    for k in ctx.schedule:
        if k >= len(blocks):
            joined = "".join(f" {j}: the encoder ends there, and the blocks after it run on the "
                             "decoder's tokens (merges go before block "
                             f"{j.depth})." for j in ctx.analysis.joins)
            raise ScheduleError(f"block {k} is out of range: the encoder has {len(blocks)} blocks "
                                f"(0..{len(blocks) - 1}); the schedule holds 0-based block "
                                f"indices.{joined} {describe_encoder(gm, ctx.analysis)}")
    if not ctx.merges_anything:
        return gm
    ctx.method.check_counts(ctx.schedule, ctx.analysis.image_tokens)
    for block in blocks[min(ctx.schedule):]:
        for inner, reader in leaks(block):
            raise UnsupportedGraph(
                f"{module_path(reader)} ({reader.name}) reads {inner.name}, a value inside "
                f"encoder block {block.index} ({block.name}) other than its output (e.g. "
                "attention weights). After a merge such values have fewer tokens and no "
                f"reconstruction; schedule merges after block {block.index} or stop returning it.")
    return gm
