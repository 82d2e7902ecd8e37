"""mpm_fx: Mutual Pair Merging as a compiler pass for ViT segmenters."""

from mpm_fx.errors import (
    CaptureError,
    EncoderNotFound,
    MPMError,
    NoAttentionFound,
    ScheduleError,
    TrainingModeError,
    UnsupportedGraph,
)
from mpm_fx.ops import MergeResult, compose, merge, reconstruct
from mpm_fx.optimize import PAPER_SCHEDULE, OptimizedModule, Report, optimize
from mpm_fx.tuning import TuneResult, tune

__all__ = [
    "optimize", "aot_compile", "tune", "TuneResult", "OptimizedModule", "Report",
    "PAPER_SCHEDULE",
    "MergeResult", "merge", "compose", "reconstruct",
    "MPMError", "ScheduleError", "TrainingModeError", "CaptureError", "NoAttentionFound",
    "EncoderNotFound", "UnsupportedGraph",
]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "aot_compile":  # imported on use: it pulls in Inductor
        from mpm_fx.backends.aot import aot_compile
        return aot_compile
    raise AttributeError(f"module 'mpm_fx' has no attribute {name!r}")
