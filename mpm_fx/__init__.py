"""mpm_fx: Mutual Pair Merging as a compiler pass for ViT segmenters.

The public names load on first use (PEP 562), so ``import mpm_fx`` and ``mpm-bench --help`` do
not import torch until something needs it.
"""

from __future__ import annotations

import importlib

__all__ = [
    "optimize", "aot_compile", "export_onnx", "tune", "TuneResult", "OptimizedModule", "Report", "METHODS",
    "PAPER_SCHEDULE",
    "MergeResult", "merge", "compose", "reconstruct",
    "MPMError", "ScheduleError", "TrainingModeError", "CaptureError", "NoAttentionFound",
    "EncoderNotFound", "UnsupportedGraph", "GraphBreakError",
]
__version__ = "0.1.0"

_WHERE = {
    "optimize": "optimized", "OptimizedModule": "optimized", "Report": "optimized",
    "PAPER_SCHEDULE": "schedule", "METHODS": "methods",
    "aot_compile": "backends.aot", "export_onnx": "backends.onnx",
    "tune": "tuning", "TuneResult": "tuning",
    "MergeResult": "ops", "merge": "methods.mpm", "compose": "ops", "reconstruct": "ops",
    "MPMError": "errors", "ScheduleError": "errors", "TrainingModeError": "errors",
    "CaptureError": "errors", "NoAttentionFound": "errors", "EncoderNotFound": "errors",
    "UnsupportedGraph": "errors", "GraphBreakError": "errors",
}


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'mpm_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mpm_fx.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
