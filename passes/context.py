"""What every pass receives: the analysis, the request, and what earlier passes made."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx

from mpm_fx.methods import Merging, merging
from mpm_fx.passes.analysis import Analysis

__all__ = ["PassContext", "MergePoint", "Merges"]


@dataclass(frozen=True)
class MergePoint:
    """The nodes of one inserted merge."""

    block: int  # the encoder block it merges in (before it, or between its attention and MLP)
    tokens: fx.Node  # (B, P + M, D)
    merge_map: fx.Node  # (B, N_before)
    valid: fx.Node  # (B, M)
    total_map: fx.Node  # (B, N0): composed with every earlier merge
    placement: str = "before_block"  # or "after_attention" (the block's attention is unmerged)
    padded: bool = True  # whether images of a batch can get different counts (valid masks them)
    bounds: tuple = (1, None)  # (least, most) image tokens per image after it

    @property
    def last(self) -> fx.Node:
        """The merge's last node (its compose, else its valid): what reads both maps and the
        mask goes after it."""
        return self.total_map if self.total_map is not self.merge_map else self.valid


@dataclass
class Merges:
    points: list = field(default_factory=list)

    def last_before(self, depth: int):
        """The last merge whose tokens the stream carries at ``depth`` (merge block < depth)."""
        done = [p for p in self.points if p.block < depth]
        return done[-1] if done else None

    def in_block(self, block: int):
        """The last merge whose tokens the attention of block ``block`` runs on: merges in
        earlier blocks, and one before this block (not one after its attention)."""
        done = [p for p in self.points if p.block < block
                or (p.block == block and p.placement == "before_block")]
        return done[-1] if done else None


@dataclass
class PassContext:
    """The state of one run of the pipeline.

    analysis:     what the captured graph is (frozen, from ``analysis.analyse``);
    schedule:     the blocks to merge before, sorted; () when nothing is merged (also for a
                  batch of no images);
    inputs:       the flat example inputs of the capture (passes that evaluate constants);
    method:       the merge method and its options (``mpm_fx.methods.Merging``): what
                  ``insert_merges`` inserts, and ``size_aware_attention``'s option;
    token_counts: option of ``output_token_counts``;
    encoder_outputs: option of ``output_encoder``;
    merges:       filled by ``insert_merges``, read by the later passes;
    stats:        what each pass did, by name (the rows of ``Report.stats``).
    """

    analysis: Analysis
    schedule: tuple
    inputs: list
    method: Merging = field(default_factory=merging)
    token_counts: bool = True
    encoder_outputs: bool = False
    merges: Merges = field(default_factory=Merges)
    stats: Counter = field(default_factory=Counter)

    @property
    def size_aware(self) -> bool:
        """Proportional attention after merges (the method's option)."""
        return self.method.size_aware

    @property
    def merges_anything(self) -> bool:
        """Whether anything is merged: a schedule, and images to merge."""
        return bool(self.schedule) and self.analysis.batch > 0
