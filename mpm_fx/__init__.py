"""mpm_fx: Mutual Pair Merging as a compiler pass for ViT segmenters."""

from mpm_fx.ops import MergeResult, compose, merge, reconstruct

__all__ = ["MergeResult", "merge", "compose", "reconstruct"]
__version__ = "0.1.0"
