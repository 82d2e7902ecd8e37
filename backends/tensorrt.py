"""``mpm_tensorrt``: the MPM pass on dynamo's graph, then TensorRT engines between the merges.

    torch.compile(model, backend="mpm_tensorrt", options={"schedule": (2, 5), ...})

torch-tensorrt installs from PyPI (``pip install "mpm-fx[tensorrt]"``: torch-tensorrt 2.14 for
torch 2.14, with NVIDIA's ``tensorrt-cu13`` wheels), but TensorRT builds its engines on a CUDA
GPU: UNTESTED end to end in this workplace, which has none. What is ours is tested without it
(``partition`` and the plan, with a stand-in segment compiler; the dry-run report's handling).

The pipeline marks every node it inserts (``passes.graph.MARK``). The merges, the map
compositions and the reconstruction gathers (data-dependent: ``nonzero``, argmax, gathers)
run in PyTorch; the graph is split at them, and every other segment (the blocks, the decoder)
is handed to torch-tensorrt's dynamo backend as its own graph. Only those nodes stay in
PyTorch: a ``gather`` or ``cumsum`` of the model itself still goes to TensorRT. The token dim of
a segment after a merge is data-dependent; its range is the merge's ``torch._check`` bounds
(``MergePoint.bounds``: ``token_bounds`` of MPM's module, the one count N - r for the
methods that merge a fixed count), which the fake tensors torch-tensorrt receives carry. Other
options go to torch-tensorrt's ``CompilationSettings``; ``dryrun="report.txt"`` (its coverage
report instead of engines) gives every segment's report in that one file.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.split_module import split_module

from mpm_fx.backends._common import allow_data_dependent_shapes, split_options
from mpm_fx.passes import Program, rewrite_dynamo_graph
from mpm_fx.passes.graph import MARK

__all__ = ["mpm_tensorrt", "tensorrt_plan", "TensorRTPlan", "partition", "PYTORCH_ROLES"]

# Roles (``node.meta[MARK]``) of the inserted nodes that run in PyTorch. The others (padding
# masks, size-aware logits, size expressions, token counts) are plain tensor code that belongs
# in the engines around them.
PYTORCH_ROLES = frozenset({"merge", "compose", "reconstruct"})


@dataclass(frozen=True)
class TensorRTPlan:
    segments: tuple  # (submodule name, "tensorrt" | "pytorch") in the order they run
    token_ranges: tuple  # per merge: (min, max) tokens (prefix included) the next engines take


def tensorrt_plan(program: Program) -> TensorRTPlan:
    """How ``mpm_tensorrt`` splits one rewritten program, and the token ranges of the engines
    after each merge (the merge's own bounds)."""
    analysis, split = program.context.analysis, partition(program.gm)
    P = analysis.prefix_tokens
    ranges = tuple((P + p.bounds[0], P + p.bounds[1]) for p in program.context.merges.points)
    return TensorRTPlan(_segments(split), ranges)


def partition(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` split into submodules ``submod_<k>``: runs of the pipeline's PyTorch nodes
    (``PYTORCH_ROLES``) and runs of everything else, in graph order. The split module computes
    the same as ``gm``."""
    runs, current, last = {}, -1, None

    def runs_in_pytorch(node: fx.Node) -> bool:
        return node.meta.get(MARK) in PYTORCH_ROLES

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        where = runs_in_pytorch(node)
        if where != last:
            current, last = current + 1, where
        runs[node] = current
    split = split_module(gm, gm, lambda node: runs[node], keep_original_order=True)
    for _, sub in _submodules(split):
        sub.meta["pytorch"] = any(runs_in_pytorch(n) for n in sub.graph.nodes
                                  if n.op == "call_function")
    return split


def _submodules(split: fx.GraphModule) -> list:
    """The segments split_module made (``submod_<k>``), in the order the split module calls."""
    return [(n.target, split.get_submodule(n.target)) for n in split.graph.nodes
            if n.op == "call_module"]


def _segments(split: fx.GraphModule) -> tuple:
    return tuple((name, "pytorch" if sub.meta["pytorch"] else "tensorrt")
                 for name, sub in _submodules(split))


def mpm_tensorrt(gm, example_inputs, options=None, *, compile_segment=None):
    """The dynamo backend. ``compile_segment(gm, sample_inputs)`` compiles one TensorRT
    segment (default: torch-tensorrt's dynamo backend with the remaining options)."""
    schedule, method, trt_options = split_options(options)
    if method.attention == "varlen":
        raise ValueError("attention='varlen' calls mpm_fx's own attention op, which TensorRT "
                         "engines cannot hold: use attention='masked' (or leave it out) with "
                         "mpm_tensorrt")
    method = dataclasses.replace(method, attention="masked")
    report = trt_options.get("dryrun")
    if compile_segment is None:
        backend = _torch_tensorrt_backend()

        def compile_segment(segment, inputs, **options):
            return backend(segment, inputs, options={**trt_options, **options})

    program = rewrite_dynamo_graph(gm, example_inputs, schedule, method=method)
    allow_data_dependent_shapes()
    split = partition(program.gm)
    inputs = _segment_inputs(split, example_inputs)
    reports, segments = [], _segments(split)
    for name, kind in segments:
        if kind != "tensorrt":
            continue
        options = {}
        if isinstance(report, str):  # one report per segment, gathered into the file below
            options["dryrun"] = f"{report}.{name}"
            reports.append((name, Path(options["dryrun"])))
        setattr(split, name, _Compiled(compile_segment(getattr(split, name), inputs[name],
                                                       **options)))
    if reports:
        _gather_reports(Path(report), reports, segments)
    return split


def _gather_reports(path: Path, reports: list, segments: tuple) -> None:
    """The dry-run reports of the TensorRT segments, in order, in one file, with the segments
    that stay in PyTorch (the merges, compositions and gathers) named between them."""
    parts = [f"mpm_tensorrt: {len(segments)} segments, "
             f"{sum(kind == 'tensorrt' for _, kind in segments)} to TensorRT\n"]
    found = dict(reports)
    for name, kind in segments:
        if kind == "pytorch":
            parts.append(f"\n== {name}: PyTorch (merge, compose, reconstruct)\n")
        elif found[name].exists():
            parts.append(f"\n== {name}: TensorRT\n{found[name].read_text()}")
            found[name].unlink()
        else:
            parts.append(f"\n== {name}: TensorRT (no report written)\n")
    path.write_text("".join(parts))


def _segment_inputs(split: fx.GraphModule, example_inputs) -> dict:
    """The (fake) inputs of every segment, propagated from the example inputs: after a merge
    their token dims are the merge's unbacked sizes, with its bounds."""
    context = torch._guards.TracingContext.try_get()
    mode = context.fake_mode if context is not None else None
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        mode = FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True,
                                                 allow_scalar_outputs=True),
                              allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(
        x, torch._subclasses.FakeTensor) else x for x in example_inputs]
    # a merge's count is a fresh unbacked size that a segment may return only inside a
    # larger expression (P + M, at batch 1 no valid mask follows it): not an error here
    env = mode.shape_env
    with env.ignore_fresh_unbacked_symbols() if env is not None else contextlib.nullcontext():
        FakeTensorProp(split, mode).propagate_dont_convert_inputs(*fake)
    inputs = {}
    for node in split.graph.nodes:
        if node.op == "call_module":
            inputs[node.target] = [a.meta.get("val") if isinstance(a, fx.Node) else a
                                   for a in node.args]
    return inputs


class _Compiled(nn.Module):
    """A compiled segment (any callable) where the split module calls a submodule."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _torch_tensorrt_backend():
    try:
        from torch_tensorrt.dynamo.backend import torch_tensorrt_backend
    except ImportError as e:
        raise ImportError(
            f"backend='mpm_tensorrt' needs torch-tensorrt ({e}): pip install "
            "'mpm-fx[tensorrt]' (torch-tensorrt and NVIDIA's tensorrt-cu13 wheels from PyPI; "
            "its engines need a CUDA GPU). backend='mpm_inductor' needs neither.") from e
    return torch_tensorrt_backend
