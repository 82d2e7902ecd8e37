"""What the dynamo backends share: reading options and letting the compile keep merges."""

from __future__ import annotations

import dataclasses
import logging
import threading

import torch

from mpm_fx.schedule import PAPER_SCHEDULE, normalize_schedule

log = logging.getLogger("mpm_fx")


class _Programs(threading.local):
    """Whether this thread is inside ``torch.compile(optimized_module)``'s call of its program
    (``OptimizedModule.forward`` runs it ``with PROGRAMS``): a backend then receives a graph
    mpm_fx already rewrote, which ``mpm_inductor`` compiles as it is instead of merging again.
    (Entering and leaving are never traced: dynamo compiles the frames that forward calls.)"""

    depth = 0

    def active(self) -> bool:
        return self.depth > 0

    @torch.compiler.disable
    def __enter__(self):
        self.depth += 1

    @torch.compiler.disable
    def __exit__(self, *exc):
        self.depth -= 1


PROGRAMS = _Programs()


def split_options(options) -> tuple:
    """(schedule, merging, the rest) of a backend's ``options``: ``schedule`` defaults to the
    paper's (2, 5); ``method`` (default "mpm") and its options (``r``, ``placement``,
    ``size_aware`` and the method's own, ``mpm_fx.methods``) make the ``Merging``; the rest are
    the compiler's."""
    from mpm_fx.methods import merging, option_names

    options = dict(options or {})
    schedule = normalize_schedule(options.pop("schedule", PAPER_SCHEDULE))
    method = options.pop("method", "mpm")
    chosen = {k: options.pop(k) for k in option_names(method) if k in options}
    return schedule, merging(method, schedule=schedule, **chosen), options


def allow_data_dependent_shapes() -> None:
    """Let this compile trace ``nonzero`` (the merged count is data-dependent).

    Dynamo creates its shape environment from ``capture_dynamic_output_shape_ops`` before the
    backend runs; the merges only appear inside the backend, so the setting of this one
    compilation is switched on here (not the global config)."""
    context = torch._guards.TracingContext.try_get()
    if context is None or context.fake_mode is None or context.fake_mode.shape_env is None:
        return  # outside dynamo: compile_fx makes its own, which allows them
    env = context.fake_mode.shape_env
    env.settings = dataclasses.replace(env.settings, allow_dynamic_output_shape_ops=True,
                                       allow_scalar_outputs=True)
