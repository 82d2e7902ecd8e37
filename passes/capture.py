"""Capture: trace a model into one flat ATen-level FX graph at the shapes of its example inputs.

A forward that branches in Python on a tensor's value cannot be traced as it is. When that
value is computed from the model's own parameters and buffers alone (EoMT's mask annealing,
``if self.attn_mask_probs[i] > 0``, 0 at inference), the capture is done again with
``torch.export.draft_export``, which runs the model on its real values and specialises the
branch on them (keeping an ``item()`` and a runtime assert of the value in the graph). Each
specialised branch is kept only if every value it reads is a parameter, buffer or constant; a
branch on a value computed from the inputs stays a ``CaptureError`` naming its source line.
The ``Captured`` records what was specialised (source line, the state it read and its value
then), so that a cache can capture again when those values change.

We capture with ``torch.export(strict=False)``: it runs the model's own Python once, so any
``nn.Module`` that runs eagerly without data-dependent Python control flow traces, keeps
``scaled_dot_product_attention``, ``linear`` and ``layer_norm`` as single nodes (what the analysis
reads), records the module path of every node, and leaves parameters as ``get_attr`` nodes that
point at the model's own ``nn.Parameter`` objects. Shapes are static; after a merge the token count
is made symbolic again by ``passes.follow_token_count``. Dynamo would also give an FX graph, but
at the Torch-function level (``F.linear``, methods) and with guards we would have to manage.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from mpm_fx.errors import CaptureError, TrainingModeError
from mpm_fx.passes.graph import NodeOrder

__all__ = ["Captured", "Specialization", "capture", "captures_shared", "check_eval",
           "dynamo_image_inputs", "leaf_key", "ITEM"]

ITEM = {torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default}
_NOISY = ("torch.export._draft_export", "torch._export", "torch.export",
          "torch.fx.experimental.symbolic_shapes")


@dataclass(frozen=True)
class Specialization:
    """A Python branch specialised on the model's own values at capture."""

    where: str  # "modeling_eomt.py:1108"
    code: str  # the source line
    reads: tuple  # names of the parameters and buffers it reads
    values: tuple = field(repr=False, default=())  # their values then (clones), by ``reads``

    def holds(self, model: nn.Module) -> bool:
        """Whether the model's tensors still hold the values the branch was specialised on."""
        for name, then in zip(self.reads, self.values):
            try:
                now = model.get_parameter(name)
            except AttributeError:
                now = model.get_buffer(name)
            if now.shape != then.shape or not torch.equal(now.detach().to(then.device), then):
                return False
        return True

    def __str__(self) -> str:
        return f"{self.where}: {self.code} (reads {', '.join(self.reads)})"


@dataclass
class Captured:
    """A traced model: ``gm`` takes and returns flat lists of leaves; the specs rebuild them;
    ``specialized`` lists the branches specialised on the model's own values."""

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    specialized: tuple = ()


def check_eval(model: nn.Module) -> None:
    """Raise TrainingModeError naming the submodules in training mode, if any: merging is an
    inference transform, captured in eval mode."""
    names = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if names:
        raise TrainingModeError(
            f"the model is in training mode ({', '.join(names[:3]) or 'top level'}"
            f"{', ...' if len(names) > 3 else ''}): MPM is an inference transform. "
            "Call model.eval() before mpm_fx.optimize and before calling it.")


_SHARED: list = []  # the open captures_shared() memos, innermost last


@contextlib.contextmanager
def captures_shared():
    """Inside, capturing a model again at inputs of the same structure, shapes and dtypes, its
    modules, parameters and buffers the same objects at the same versions, gives a copy of the
    first capture's graph (the model's parameters shared, as a capture shares them) instead of
    tracing it again: for searches that rewrite one model many ways (``mpm_fx.tune``; a
    ``torch.export`` of DINOv2-S/14 at 448 px took about half of each candidate's time). The
    passes rewrite the copy; the first capture is never changed."""
    _SHARED.append({})
    try:
        yield
    finally:
        _SHARED.pop()


def capture(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    if not _SHARED:
        return _capture(model, args, kwargs)
    key = _capture_key(model, args, kwargs)
    if key is None:
        return _capture(model, args, kwargs)
    memo = _SHARED[-1]
    if key not in memo:  # the model is kept with its capture: no id of it is reused meanwhile
        memo[key] = (model, _capture(model, args, kwargs))
    first = memo[key][1]
    gm = fx.GraphModule(first.gm, copy.deepcopy(first.gm.graph))  # attributes shared
    return Captured(gm, first.in_spec, first.out_spec, first.specialized)


def _capture_key(model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """What a capture depends on: the model's objects (by identity, tensors with their
    in-place version) and the inputs' structure, shapes, dtypes and plain values; None when
    a tensor of the model keeps no version (made under inference_mode): never shared."""
    state = []
    for module in model.modules():
        state.append((id(module), module.training))
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None and t.is_inference():
                return None
            state.append((id(t), t._version) if t is not None else None)
    flat, spec = pytree.tree_flatten((args, kwargs))
    return tuple(state), spec, tuple(leaf_key(v) for v in flat)


def leaf_key(value):
    """What a capture depends on of one input leaf: a tensor's shape, dtype and device, or a
    plain value (any other object by its repr)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    return value if isinstance(value, (int, float, bool, str, type(None))) else repr(value)


def _capture(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    specialized = ()
    try:
        with _quiet(*_NOISY):  # a failed guard logs the whole graph; the error says what matters
            exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # the exporter raises many types; all mean "cannot trace"
        if not _data_dependent(e):
            raise CaptureError(
                f"torch.export(strict=False) could not trace {type(model).__name__}: "
                f"{type(e).__name__}: {_first_line(e)}. mpm_fx needs a forward that "
                "torch.export can trace; check that the model runs with these example inputs "
                "and that torch.export.export(model, args, strict=False) works.") from e
        exported, specialized = _specialised(model, args, kwargs, e)
    gm = exported.module()
    in_spec, out_spec = gm._in_spec, gm._out_spec
    gm.graph._codegen = fx.graph.CodeGen()  # flat leaves in, flat leaves out: we own the specs
    gm._forward_pre_hooks.clear()  # export's check of (args, kwargs) against in_spec: ours now
    gm.recompile()
    return Captured(gm, in_spec, out_spec, specialized)


def _data_dependent(e: Exception) -> bool:
    """Whether an export failure is a Python branch (or size) on a tensor's value."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen, err = set(), e
    while err is not None and id(err) not in seen:
        if isinstance(err, GuardOnDataDependentSymNode) or "data-dependent" in str(err).lower():
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _specialised(model: nn.Module, args: tuple, kwargs: dict, first: Exception) -> tuple:
    """draft_export's capture, kept only where every specialised value comes from the model's
    parameters, buffers and constants; (exported program, specialisations)."""
    from torch.export._draft_export import FailureType

    try:
        with _quiet(*_NOISY):
            draft = torch.export.draft_export(model, args, kwargs, strict=False)
    except Exception as e:
        raise CaptureError(f"torch.export could not trace {type(model).__name__}: "
                           f"{type(first).__name__}: {_first_line(first)}; nor could draft_export "
                           f"specialise it ({type(e).__name__}: {_first_line(e)})") from first
    other = [f for f in draft._report.failures
             if f.failure_type != FailureType.DATA_DEPENDENT_ERROR]
    if other:
        raise CaptureError(f"torch.export could not trace {type(model).__name__}: "
                           f"{type(first).__name__}: {_first_line(first)}; draft_export also "
                           f"reports {other[0].failure_type.name}") from first
    gm = draft.module()
    order = NodeOrder(gm.graph)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = dict(gm.named_parameters()) | dict(gm.named_buffers())
    found = []
    for item in (n for n in gm.graph.nodes if n.op == "call_function" and n.target in ITEM):
        where, code = _source(item)
        if any(order.depends(item, p) for p in inputs):
            raise CaptureError(
                f"{where}: `{code}` branches in Python on a value computed from the model's "
                "inputs, which one capture cannot follow for every input. mpm_fx specialises "
                "only branches on the model's own parameters and buffers; rewrite the branch "
                "with torch.where or torch.cond, or make it depend on a Python flag.") from first
        reads = tuple(n.target for n in order.nodes if n.op == "get_attr" and n.target in state
                      and order.depends(item, n))
        found.append(Specialization(where, code, reads,
                                    tuple(state[name].detach().clone() for name in reads)))
    merged = {}
    for s in found:  # one entry per source line (a loop specialises it once per pass)
        prev = merged.get((s.where, s.code))
        if prev is None:
            merged[s.where, s.code] = s
        else:
            reads = tuple(dict.fromkeys(prev.reads + s.reads))
            merged[s.where, s.code] = Specialization(
                s.where, s.code, reads, tuple(state[name].detach().clone() for name in reads))
    return draft, tuple(merged.values())


@contextlib.contextmanager
def _quiet(*names):
    """Loggers that print whole graphs on a data-dependent guard (export) and draft_export's
    report; mpm_fx's error or warning says what matters."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    printed = io.StringIO()  # a failed export also prints its partial graph to stderr
    try:
        with contextlib.redirect_stderr(printed):
            yield
    except BaseException:
        raise  # what it printed was the failure's graph: the error raised says what matters
    else:
        sys.stderr.write(printed.getvalue())  # a success keeps what it printed (warnings)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _source(node: fx.Node) -> tuple:
    """("file.py:line", code) of the model's line that made ``node``, from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', trace)
    if not frames:
        return "an unknown line", str(node.target)
    path, line, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}", code.strip()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def dynamo_image_inputs(gm: fx.GraphModule):
    """Positions of the user's own inputs among the placeholders of a graph from dynamo, which
    also passes the model's parameters and buffers as inputs (sources under ``L['self']``).
    None when the graph does not come from dynamo."""
    positions = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        arg = node.meta.get("grapharg")
        if arg is None or getattr(arg, "source", None) is None:
            return None
        if not arg.source.name.startswith("L['self']"):
            positions.append(i)
    return positions
