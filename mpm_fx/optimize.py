"""``mpm_fx.optimize``: a model in, the same model with MPM merging out.

The returned module shares the model's parameters, buffers and submodules (the same objects, so
``state_dict`` keys are the model's own and load both ways) and has the same call signature. On
each new input signature (shapes, dtypes, devices, non-tensor values) it captures the model and
runs the pass pipeline of ``mpm_fx.passes``; later calls with that signature reuse the program.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from mpm_fx.errors import ScheduleError, TrainingModeError
from mpm_fx.passes import Program, rewrite
from mpm_fx.passes.analysis import module_path

__all__ = ["optimize", "OptimizedModule", "Report", "PAPER_SCHEDULE"]

PAPER_SCHEDULE = (2, 5)


def optimize(model: nn.Module, schedule=PAPER_SCHEDULE, example_inputs=None, *,
             size_aware: bool = False) -> OptimizedModule:
    """Return ``model`` with Mutual Pair Merging before the encoder blocks in ``schedule``.

    schedule:        0-based encoder block indices to merge before (paper default (2, 5));
                     an empty schedule leaves outputs bit-identical.
    example_inputs:  a tensor or a tuple of positional inputs; if given, the model is captured
                     and analysed now (so errors surface here), else on the first call.
    size_aware:      add log(token size) to the logits of every attention after a merge
                     (proportional attention, folded so SDPA keeps its flash kernel; off in
                     the paper).
    """
    if isinstance(model, OptimizedModule):
        model = model.original
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    optimized = OptimizedModule(model, normalize_schedule(schedule), bool(size_aware))
    _let_dynamo_capture_merges()
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(
            example_inputs)
        optimized.prepare(*args)
    return optimized


def _let_dynamo_capture_merges() -> None:
    """``torch.compile(optimize(model))`` traces the merge, whose token count comes from
    ``nonzero``. With dynamo's default config that op breaks the graph (and with
    ``fullgraph=False`` the forward silently runs in pieces), so these two process-wide flags
    are switched on; they only let dynamo keep data-dependent ops in its graphs. The
    ``mpm_inductor`` backend does not need them."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True


def normalize_schedule(schedule) -> tuple:
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise ScheduleError(f"schedule must be a sequence of block indices such as (2, 5), "
                            f"got {schedule!r}")
    blocks = []
    for k in schedule:
        if isinstance(k, bool):
            raise ScheduleError(f"schedule entry {k!r} is a bool, not a block index")
        try:
            k = operator.index(k)
        except TypeError:
            raise ScheduleError(f"schedule entry {k!r} is not an int: the schedule holds 0-based "
                                "encoder block indices, e.g. (2, 5)") from None
        if k < 0:
            raise ScheduleError(f"schedule entry {k} is negative: use 0-based block indices "
                                "counted from the first encoder block")
        if k in blocks:
            raise ScheduleError(f"block {k} appears twice in the schedule {tuple(schedule)}: "
                                "each block is merged before at most once")
        blocks.append(k)
    return tuple(sorted(blocks))


@dataclass(frozen=True)
class Report:
    """What the pass found and did, and the token counts of the last call."""

    schedule: tuple
    blocks: tuple  # (index, block module path, "sdpa" | "softmax") per encoder block
    prefix_tokens: int
    image_tokens: int  # N0: image tokens at the encoder input
    taps: tuple  # (depth, readers, gathered): readers of stream[depth]; gathered if rebuilt
    token_counts: tuple  # per merge, per image: image tokens after it (last call)
    batch: int
    masked_attentions: int  # attentions given a padding mask (batch > 1)
    symbolic_sizes: int  # size arguments made to follow the token count
    size_aware: int = 0  # attentions given log(token size) (option size_aware)

    def __str__(self) -> str:
        lines = [f"schedule {self.schedule}: {len(self.blocks)} encoder blocks, "
                 f"{self.prefix_tokens} prefix tokens, {self.image_tokens} image tokens, "
                 f"batch {self.batch}"]
        for index, name, kind in self.blocks:
            mark = "  <- merge before" if index in self.schedule else ""
            lines.append(f"  block {index:2d}  {name} ({kind}){mark}")
        for depth, readers, gathered in self.taps:
            how = "reconstructed" if gathered else "unmerged"
            where = f"after block {depth - 1}" if depth else "at the encoder input"
            lines.append(f"  tap {where}: {', '.join(readers)} ({how})")
        for k, counts in zip(self.schedule, self.token_counts):
            lines.append(f"  tokens after merge before block {k}: {list(counts)}")
        return "\n".join(lines)


class OptimizedModule(nn.Module):
    """The model with MPM; see ``optimize``. Not built directly."""

    def __init__(self, model: nn.Module, schedule: tuple, size_aware: bool = False):
        super().__init__()
        # Share, not copy: the same Parameter, buffer and submodule objects under the same names.
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self._modules = model._modules
        self.training = model.training
        self.__dict__["original"] = model  # not registered: state_dict stays the model's
        self.__dict__["_programs"] = {}
        self.__dict__["_last"] = None
        self.schedule = schedule
        self.size_aware = size_aware
        self._check_eval()

    def forward(self, *args, **kwargs):
        self._check_eval()
        if not self.schedule:  # nothing to merge: the model itself, bit for bit
            return self.original(*args, **kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        if torch.compiler.is_compiling():  # torch.compile(optimize(model)): no capture inside
            program = self._captured_for(flat)
        else:
            program = self._program(args, kwargs, flat, spec)
        *outputs, counts = program.gm(*flat)
        self.__dict__["_last"] = (program, counts)
        return pytree.tree_unflatten(outputs, program.out_spec)

    def prepare(self, *args, **kwargs) -> Program:
        """Capture and rewrite for these inputs now (``optimize(example_inputs=...)`` calls it)."""
        self._check_eval()
        flat, spec = pytree.tree_flatten((args, kwargs))
        return self._program(args, kwargs, flat, spec)

    def mpm_report(self) -> Report:
        if self._last is None and not self._programs:
            raise RuntimeError("mpm_report: the model has not been captured yet; call it once or "
                               "pass example_inputs to mpm_fx.optimize")
        program, counts = self._last or (next(reversed(self._programs.values())), None)
        enc = program.encoder
        taps = tuple((t.depth, tuple(sorted({_reader_name(u) for u in t.users})),
                      t.depth in program.reconstructed) for t in enc.taps)
        return Report(
            schedule=program.schedule,
            blocks=tuple((b.index, b.module or b.name, b.kind) for b in enc.blocks),
            prefix_tokens=enc.prefix_tokens,
            image_tokens=enc.image_tokens,
            taps=taps,
            token_counts=tuple(tuple(row) for row in counts.tolist()) if counts is not None else (),
            batch=enc.batch,
            masked_attentions=program.masked_attentions,
            symbolic_sizes=program.symbolic_sizes,
            size_aware=program.size_aware,
        )

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, size_aware={self.size_aware}"

    def _program(self, args, kwargs, flat, spec) -> Program:
        key = (spec, tuple(_leaf_key(v) for v in flat))
        program = self._programs.get(key)
        if program is None:
            program = _capture(self.original, args, kwargs, self.schedule,
                               size_aware=self.size_aware)
            self._programs[key] = program
        return program

    def _captured_for(self, flat) -> Program:
        """The program for these inputs, found by shapes and dtypes only (what a compiler
        tracing this module can compare); capture itself cannot run while tracing."""
        keys = tuple(_leaf_key(v) for v in flat)
        for key, program in self._programs.items():
            if key[1] == keys:
                return program
        raise RuntimeError(
            "torch.compile reached an mpm_fx-optimized model that was not captured for inputs "
            "of these shapes: capture runs eagerly. Pass example_inputs to mpm_fx.optimize or "
            "call the model once before compiling it; or use torch.compile(model, "
            "backend='mpm_inductor'), which needs neither.")

    def _apply(self, fn, recurse=True):
        self._programs.clear()  # dtype or device changed: capture again
        return super()._apply(fn, recurse)

    def _check_eval(self) -> None:
        training = [name or type(self.original).__name__
                    for name, m in self.original.named_modules() if m.training]
        if self.training or training:
            raise TrainingModeError(
                f"the model is in training mode ({', '.join(training[:3]) or 'top level'}"
                f"{', ...' if len(training) > 3 else ''}): MPM is an inference transform. "
                "Call model.eval() before mpm_fx.optimize and before calling it.")


# Capture never runs under dynamo, even when a compiled caller reaches it.
_capture = torch.compiler.disable(rewrite)


def _leaf_key(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    return value if isinstance(value, (int, float, bool, str, type(None))) else repr(value)


def _reader_name(node) -> str:
    return "output" if node.op == "output" else module_path(node)
