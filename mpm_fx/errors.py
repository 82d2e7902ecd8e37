"""Exceptions of mpm_fx. Each names the problem and what to do about it."""

from __future__ import annotations

__all__ = [
    "MPMError",
    "ScheduleError",
    "TrainingModeError",
    "CaptureError",
    "NoAttentionFound",
    "EncoderNotFound",
    "UnsupportedGraph",
    "GraphBreakError",
]


class MPMError(ValueError):
    """Base class: the model or the arguments cannot be optimized as given."""


class ScheduleError(MPMError):
    """The schedule is not a set of distinct block indices of the encoder."""


class TrainingModeError(MPMError):
    """The model is in training mode; MPM is an inference transform."""


class CaptureError(MPMError):
    """torch.export could not trace the model."""


class NoAttentionFound(MPMError):
    """The traced graph has no attention the pass recognises."""


class EncoderNotFound(MPMError):
    """Attention was found, but no chain of residual transformer blocks around it."""


class UnsupportedGraph(MPMError):
    """The encoder has a structure the rewrite cannot keep exact (named in the message)."""


class GraphBreakError(MPMError):
    """A compiler backend received a fragment of the model: dynamo broke the graph."""
