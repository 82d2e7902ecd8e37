"""``aot_compile``: the model with MPM as an AOTInductor ``.pt2`` package (the pass pipeline,
``torch.export`` of the rewritten program, AOTInductor). The package runs without Python model
code and without mpm_fx::

    runner = torch._inductor.aoti_load_package("model.pt2")     # Python
    torch::inductor::AOTIModelPackageLoader loader("model.pt2");  // C++

AOTInductor compiles for the machine it runs on (its C++ compiler and CPU flags): build the
``.pt2`` on the target (e.g. the Raspberry Pi 5) or on a machine of the same architecture.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from mpm_fx.methods import merging
from mpm_fx.passes import portable, rewrite, with_signature
from mpm_fx.passes.capture import capture, check_eval
from mpm_fx.schedule import PAPER_SCHEDULE, normalize_schedule

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
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    schedule = normalize_schedule(schedule)
    chosen = merging(method, schedule=schedule, size_aware=size_aware, **method_options)
    if chosen.attention == "varlen":
        raise ValueError("attention='varlen' calls mpm_fx's own attention op, which a .pt2 that "
                         "runs without mpm_fx cannot hold: use attention='masked' (or leave it "
                         "out) for aot_compile")
    chosen = dataclasses.replace(chosen, attention="masked")
    check_eval(model)
    if schedule:
        program = rewrite(model, args, {}, schedule, method=chosen, token_counts=False)
        gm, in_spec, out_spec = program.gm, program.in_spec, program.out_spec
    else:  # the model as it is, captured the same way (branches on its own values specialised)
        captured = capture(model, args, {})
        gm, in_spec, out_spec = captured.gm, captured.in_spec, captured.out_spec
    flat = not portable(out_spec)
    if flat:
        warnings.warn(f"{type(model).__name__}'s outputs ({out_spec.type.__name__}) need the "
                      "model's library to be rebuilt: the .pt2 returns a flat tuple of its "
                      f"{out_spec.num_leaves} tensors, in pytree order", stacklevel=2)
    exported = torch.export.export(with_signature(gm, in_spec, out_spec, flat), args,
                                   strict=False)
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    out = torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                                  inductor_configs=inductor_configs or {})
    return Path(out)
