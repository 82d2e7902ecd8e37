"""``aot_compile``: the model with MPM as an AOTInductor ``.pt2`` package (the pass pipeline,
``torch.export`` of the rewritten program, AOTInductor). The package runs without Python model
code and without mpm_fx::

    runner = torch._inductor.aoti_load_package("model.pt2")     # Python
    torch::inductor::AOTIModelPackageLoader loader("model.pt2");  // C++

AOTInductor compiles for the machine it runs on (its C++ compiler and CPU flags): build the
``.pt2`` on the target (e.g. the Raspberry Pi 5) or on a machine of the same architecture.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from mpm_fx.backends._common import exported_program
from mpm_fx.schedule import PAPER_SCHEDULE

__all__ = ["aot_compile"]


def aot_compile(model: nn.Module, example_inputs, path, schedule=PAPER_SCHEDULE, *,
                method="mpm", size_aware=None, inductor_configs: dict | None = None,
                **method_options) -> Path:
    """Export ``model`` with token merging at the ``schedule`` blocks and package it at ``path``.

    example_inputs:  a tensor or a tuple of positional inputs; the package takes inputs of
                     these shapes (MPM's merged token counts inside stay data-dependent; the
                     methods with a fixed count, e.g. "tome", have static shapes throughout).
    method, size_aware, method_options: the merge method and its options (see
                     ``mpm_fx.optimize``).
    inductor_configs: AOTInductor/Inductor config patches (formerly ``options=``, still
                     taken with a DeprecationWarning).
    An empty schedule packages the model as it is (the baseline to compare against).
    The package returns the model's outputs in their structure when a process without the
    model's code can rebuild it (tensors in tuples, lists, dicts); another output class (a
    library's output dataclass) comes back as a flat tuple of its tensors, in pytree order,
    with a warning naming it.
    """
    if "options" in method_options:
        warnings.warn("aot_compile(options=...) is now inductor_configs=...", DeprecationWarning,
                      stacklevel=2)
        inductor_configs = method_options.pop("options")
    exported, _ = exported_program(model, example_inputs, schedule, method=method,
                                   size_aware=size_aware, artefact="a .pt2",
                                   **method_options)
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    out = torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                                  inductor_configs=inductor_configs or {})
    return Path(out)
