"""``mpm_fx.optimize``: a model in, the same model with MPM merging out.

The returned module shares the model's parameters, buffers and submodules (the same objects, so
``state_dict`` keys are the model's own and load both ways) and has the same call signature. On
each new input signature (shapes, dtypes, devices, non-tensor values) it captures the model and
runs the pass pipeline of ``mpm_fx.passes``; later calls with that signature reuse the program.

Captured programs are a cache, never state; what that guarantees (weights, threads, copies,
compiler settings) is listed in docs/design.md, "mpm_fx.optimize: a cache around the pipeline".
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._C._dynamo.eval_frame import get_eval_frame_callback
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from mpm_fx.backends._common import PROGRAMS
from mpm_fx.methods import Merging, merging
from mpm_fx.passes import Program, rewrite
from mpm_fx.passes.capture import check_eval, leaf_key
from mpm_fx.passes.graph import module_path
from mpm_fx.schedule import PAPER_SCHEDULE, normalize_schedule

__all__ = ["optimize", "OptimizedModule", "Report", "PAPER_SCHEDULE", "normalize_schedule",
           "report_of"]


def optimize(model: nn.Module, schedule=PAPER_SCHEDULE, example_inputs=None, *,
             method="mpm", size_aware=None, **options) -> OptimizedModule:
    """Return ``model`` with token merging at the encoder blocks in ``schedule``.

    schedule:        0-based encoder block indices to merge at (paper default (2, 5));
                     an empty schedule leaves outputs bit-identical.
    example_inputs:  a tensor or a tuple of positional inputs; if given, the model is captured
                     and analysed now (so errors surface here), else on the first call.
    method:          the merge method, one of ``mpm_fx.METHODS``: "mpm" (the default, Mutual
                     Pair Merging exactly as docs/SPEC.md), "tome", "forest".
    size_aware:      add log(token size) to the logits of every attention after a merge
                     (proportional attention, folded so SDPA keeps its flash kernel); None:
                     the method's default (off for "mpm", as in the paper; on for the others).
    options:         the method's options: ``r`` (tokens removed per merge, an int or one per
                     merge; the methods with a fixed count need it), ``placement``
                     ("before_block" or "after_attention"), ``weighted`` (size-weighted means).
    """
    if isinstance(model, OptimizedModule):
        model = model.original
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    schedule = normalize_schedule(schedule)
    method = merging(method, schedule=schedule, size_aware=size_aware, **options)
    optimized = OptimizedModule(model, schedule, method)
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(
            example_inputs)
        optimized.prepare(*args)
    return optimized


@dataclass(frozen=True)
class Report:
    """What the pass found and did, and the token counts of the last call."""

    schedule: tuple
    blocks: tuple  # (index, block module path, "sdpa" | "softmax") per encoder block
    prefix_tokens: int
    image_tokens: int  # N0: image tokens at the encoder input
    taps: tuple  # (depth, readers, reconstructed): readers of stream[depth]; rebuilt or not
    token_counts: tuple  # per merge, per image: image tokens after it (last call)
    batch: int
    stats: dict = field(default_factory=dict)  # what each pass did (PassContext.stats), by name
    method: str = "mpm"  # the merge method and its options, e.g. "tome (r=100, ...)"
    specialized: tuple = ()  # branches specialised on the model's values at capture (str each)
    joins: tuple = ()  # where learned tokens join the stream after the encoder (str each)

    @property
    def masked_attentions(self) -> int:
        """Attentions that skip a batch's padding rows (batch > 1): given a padding mask, or
        run per image (``attention="varlen"``)."""
        return self.stats.get("masked_attentions", 0) + self.stats.get("varlen_attentions", 0)

    @property
    def symbolic_sizes(self) -> int:
        """Size arguments made to follow the token count."""
        return self.stats.get("symbolic_sizes", 0)

    @property
    def size_aware_attentions(self) -> int:
        """Attentions given log(token size) (option size_aware)."""
        return self.stats.get("size_aware_attentions", 0)

    def __str__(self) -> str:
        path = " -> ".join(map(str, [self.image_tokens] + [max(c) for c in self.token_counts]))
        largest = " (the largest in the batch)" if self.batch > 1 and self.token_counts else ""
        lines = [f"{path} image tokens{largest}, schedule {self.schedule}, method "
                 f"{self.method}, {len(self.blocks)} blocks, "
                 f"{_count(self.prefix_tokens, 'prefix token')}, batch {self.batch}"]
        where = "after its attention" if "after_attention" in self.method else "before"
        for index, name, kind in self.blocks:
            mark = f"  <- merge {where}" if index in self.schedule else ""
            lines.append(f"  block {index:2d}  {name} ({kind}){mark}")
        for depth, readers, rebuilt in self.taps:
            how = "reconstructed" if rebuilt else "unmerged"
            where = f"after block {depth - 1}" if depth else "at the encoder input"
            lines.append(f"  tap {where}: {', '.join(readers)} ({how})")
        for k, counts in zip(self.schedule, self.token_counts):
            lines.append(f"  tokens after the merge in block {k}: {list(counts)}")
        for join in self.joins:
            lines.append(f"  encoder ends: {join}")
        for branch in self.specialized:
            lines.append(f"  branch specialised on the model's own values: {branch}")
        if self.stats:
            lines.append("  passes: " + ", ".join(f"{k} {v}" for k, v in self.stats.items()))
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def report_of(program: Program, counts=None) -> Report:
    """The report of one program (and the token counts of a call of it)."""
    ctx = program.context
    enc = ctx.analysis
    taps = tuple((t.depth, tuple(sorted({_reader_name(u) for u in t.users})),
                  ctx.merges.last_before(t.depth) is not None) for t in enc.taps)
    return Report(
        schedule=program.schedule,
        blocks=tuple((b.index, b.module or b.name, b.kind) for b in enc.blocks),
        prefix_tokens=enc.prefix_tokens,
        image_tokens=enc.image_tokens,
        taps=taps,
        token_counts=tuple(tuple(row) for row in counts.tolist()) if counts is not None else (),
        batch=enc.batch,
        stats=dict(ctx.stats),
        method=ctx.method.describe(),
        specialized=tuple(map(str, program.specialized)),
        joins=tuple(map(str, enc.joins)),
    )


class OptimizedModule(nn.Module):
    """The model with MPM; see ``optimize``. Not built directly."""

    def __init__(self, model: nn.Module, schedule: tuple, method: Merging | None = None):
        super().__init__()
        # Share, not copy: the same Parameter, buffer and submodule objects under the same names.
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self._modules = model._modules
        self.training = model.training
        self.__dict__["original"] = model  # not registered: state_dict stays the model's
        self.__dict__.update(_empty_cache())
        self.schedule = schedule
        self.method = merging(method or "mpm", schedule=schedule)
        self.size_aware = self.method.size_aware
        _model_state(model, self)  # refuses training mode now

    def forward(self, *args, **kwargs):
        if torch.compiler.is_dynamo_compiling():  # inlined in a caller's compiled graph
            flat = pytree.tree_leaves((args, kwargs))
            program = self._traced_program(flat)
            return _outputs(program, _run(program.gm, flat))  # all traced inline
        program, flat = self._prepare_call(args, kwargs)
        if program is None:  # nothing to merge: the model itself, bit for bit
            return self.original(*args, **kwargs)
        if get_eval_frame_callback():  # torch.compile(this module): _run is the frame it compiles
            _keep_data_dependent_ops(True)
            try:
                with PROGRAMS:
                    outputs = _run(program.gm, flat)
            finally:
                _keep_data_dependent_ops(False)
        else:
            outputs = _run(program.gm, flat)
        return _outputs_eagerly(program, outputs, self)

    def prepare(self, *args, **kwargs) -> Program:
        """Capture and rewrite for these inputs now (``optimize(example_inputs=...)`` calls it)."""
        flat, spec = pytree.tree_flatten((args, kwargs))
        return self._program(args, kwargs, flat, spec, _model_state(self.original, self))

    def reset(self) -> None:
        """Drop every captured program: the next call captures again. Needed only after a
        change capture cannot see, such as a Python attribute a forward reads (e.g. a flag);
        replaced modules, parameters and buffers are noticed by themselves."""
        self.__dict__.update(_empty_cache())

    def mpm_report(self) -> Report:
        if self._last is None and not self._programs:
            raise RuntimeError("mpm_report: the model has not been captured yet; call it once or "
                               "pass example_inputs to mpm_fx.optimize")
        program, counts = self._last or (next(reversed(self._programs.values())), None)
        return report_of(program, counts)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, method={self.method.describe()}"

    @torch.compiler.disable
    def _prepare_call(self, args, kwargs):
        """(program, flat inputs) for this call, capturing if needed; (None, None) when the
        model should run as it is. Never traced: under torch.compile it runs eagerly."""
        state = _model_state(self.original, self)
        if not self.schedule:
            return None, None
        flat, spec = pytree.tree_flatten((args, kwargs))
        if any(isinstance(v, FakeTensor) for v in flat):  # traced by torch.export: no capture
            return self._traced_program(flat), flat
        return self._program(args, kwargs, flat, spec, state), flat

    def _program(self, args, kwargs, flat, spec, state) -> Program:
        key = (spec, tuple(leaf_key(v) for v in flat))
        if not _same_state(state, self._state):  # modules, parameters or buffers replaced
            self.__dict__.update(_empty_cache())
        program = self._programs.get(key)
        if program is not None and not all(s.holds(self.original) for s in program.specialized):
            program = None  # a value a specialised branch read has changed: capture again
        if program is None:
            with _CAPTURE_LOCK:  # one capture at a time, process-wide (export is not reentrant)
                program = self._programs.get(key)
                if program is not None and not all(s.holds(self.original)
                                                   for s in program.specialized):
                    program = None
                if program is None:
                    program = _capture(self.original, args, kwargs, self.schedule,
                                       method=self.method)
                    if not self._programs:
                        self.__dict__["_state"] = state
                    self._programs[key] = program
        return program

    def _traced_program(self, flat) -> Program:
        """The program for these inputs, found by shapes and dtypes only (what a compiler
        tracing this module can compare); capture itself cannot run while tracing."""
        keys = tuple(leaf_key(v) for v in flat)
        for key, program in self._programs.items():
            if key[1] == keys:
                return program
        raise RuntimeError(
            "a compiler traced an mpm_fx-optimized model inside another model, for inputs it was "
            "not captured for: capture runs eagerly. Pass example_inputs to mpm_fx.optimize or "
            "call the model once before compiling or exporting the model that holds it; or use "
            "torch.compile(model, backend='mpm_inductor').")

    def _apply(self, fn, recurse=True):
        self.__dict__.update(_empty_cache())  # dtype or device changed: capture again
        return super()._apply(fn, recurse)

    def __getstate__(self):
        """Copies and pickles carry no captured program (a cache, rebuilt on the first call)."""
        return {**self.__dict__, **_empty_cache()}


def _empty_cache() -> dict:
    """No program, no last call, no model state seen (a new dict each time: never shared)."""
    return {"_programs": {}, "_last": None, "_state": None}


_CAPTURE_LOCK = threading.RLock()


def _capture(model, args, kwargs, schedule, *, method):
    """``passes.rewrite`` with dynamo off (even when a compiled caller reaches it); on failure,
    the process-wide export flags are put back as they were."""
    flags = (torch.compiler._is_compiling_flag, torch.compiler._is_exporting_flag)
    try:
        return _rewrite_eagerly(model, args, kwargs, schedule, method=method)
    except BaseException:
        torch.compiler._is_compiling_flag, torch.compiler._is_exporting_flag = flags
        raise


_rewrite_eagerly = torch.compiler.disable(rewrite)


def _run(gm, flat: list):
    """The one frame torch.compile(optimized_model) compiles: the captured program."""
    return gm(*flat)


def _outputs(program: Program, outputs, module=None):
    """The model's outputs from the program's flat ones; the token counts, the program's last
    output, are kept on ``module`` for ``mpm_report``."""
    result, extras = program.split(outputs)
    counts = extras["token_counts"]
    if module is not None and not isinstance(counts, FakeTensor):
        module.__dict__["_last"] = (program, counts)
    return result


_outputs_eagerly = torch.compiler.disable(_outputs)  # called from forward's skipped frame


# torch.compile(optimized_model): dynamo skips OptimizedModule.forward's own frame (it runs as
# plain Python: capture, cache checks) and compiles the frames it calls, i.e. _run.
torch._dynamo.eval_frame.skip_code(OptimizedModule.forward.__code__)
_FLAGS = ("capture_dynamic_output_shape_ops", "capture_scalar_outputs")
_flags_lock = threading.Lock()
_flags_users = [0, None]  # calls inside, the values to restore


@torch.compiler.disable
def _keep_data_dependent_ops(enter: bool) -> None:
    """Dynamo settings for compiling ``_run`` only: keep the merge's ``nonzero`` in the graph
    (by default it breaks the graph and the merges run eagerly). Counted across threads; the
    user's values are restored when the last call leaves. Never set outside these calls."""
    config = torch._dynamo.config
    with _flags_lock:
        if enter:
            if _flags_users[0] == 0:
                _flags_users[1] = {name: getattr(config, name) for name in _FLAGS}
                for name in _FLAGS:
                    setattr(config, name, True)
            _flags_users[0] += 1
        else:
            _flags_users[0] -= 1
            if _flags_users[0] == 0:
                for name, value in _flags_users[1].items():
                    setattr(config, name, value)


def _model_state(model: nn.Module, optimized: nn.Module) -> list:
    """Every module, parameter and buffer object of ``model``, in a fixed order (compared by
    identity: replaced ones mean a new capture); refuses training mode on the way (one walk
    per call, about 0.1 ms for a ViT-S)."""
    state, training, stack = [], optimized.training, [model]
    while stack:
        module = stack.pop()
        training = training or module.training
        state.append(module)
        state.extend(module._parameters.values())
        state.extend(module._buffers.values())
        stack.extend(m for m in reversed(module._modules.values()) if m is not None)
    if training:
        check_eval(model)
        check_eval(optimized)
    return state


def _same_state(a: list, b) -> bool:
    """Whether ``a`` holds the very objects of ``b`` (None: nothing captured yet)."""
    return b is None or (len(a) == len(b) and all(map(operator.is_, a, b)))


def _reader_name(node) -> str:
    return "output" if node.op == "output" else module_path(node)
