"""What the dynamo backends share: reading options and letting the compile keep merges."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from pathlib import Path

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


def exported_program(model, example_inputs, schedule, *, method="mpm", size_aware=None,
                     artefact: str, stacklevel: int = 3, **method_options):
    """``torch.export`` of ``model`` with token merging at ``schedule`` (the pass pipeline, the
    rewritten program given the model's signature back), for an artefact that runs without
    mpm_fx (``artefact`` names it in messages): the attention keeps its padding mask (mpm_fx's
    per-image attention op cannot travel), and outputs whose class a process without the
    model's code cannot rebuild come back as a flat tuple of tensors (with a warning). An empty
    schedule exports the model as it is, captured the same way. Returns (exported, args)."""
    import warnings

    from mpm_fx.methods import merging
    from mpm_fx.passes import portable, rewrite, with_signature
    from mpm_fx.passes.capture import capture, check_eval
    from mpm_fx.schedule import normalize_schedule

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    schedule = normalize_schedule(schedule)
    chosen = merging(method, schedule=schedule, size_aware=size_aware, **method_options)
    if chosen.attention == "varlen":
        raise ValueError(f"attention='varlen' calls mpm_fx's own attention op, which {artefact} "
                         "that runs without mpm_fx cannot hold: use attention='masked' (or "
                         "leave it out)")
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
                      f"model's library to be rebuilt: {artefact} returns a flat tuple of its "
                      f"{out_spec.num_leaves} tensors, in pytree order", stacklevel=stacklevel)
    exported = torch.export.export(with_signature(gm, in_spec, out_spec, flat), args,
                                   strict=False)
    return exported, args


def fragment_reason(gm) -> str | None:
    """Why dynamo handed a backend this graph if it is a fragment of the frame it traced: the
    graph ends at a graph break, or it is the rest of a frame after one (a resume function).
    None for a graph that is a whole frame."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and reason.graph_break:
        return _where(reason.user_stack) + reason.reason.strip().splitlines()[0]
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        code = InstructionTranslator.current_tx().f_code
    except Exception:  # noqa: BLE001 (outside dynamo, or another torch: no frame to read)
        return None
    if code.co_name.startswith("torch_dynamo_resume_in_"):
        return f"the rest of {code.co_name.removeprefix('torch_dynamo_resume_in_')} after a break"
    return None


def untraced_constructs() -> list:
    """What dynamo reported it could not trace in this process (its "unimplemented" and
    graph-break counters), each "file:line: what", newest last: where a graph broke."""
    from torch._dynamo.utils import counters

    found = []
    for group in ("unimplemented", "graph_break"):
        for text in counters.get(group, {}):
            match = re.search(r'File "([^"]+)", line (\d+)', text)
            what = text.strip().splitlines()[0]
            found.append(f"{Path(match[1]).name}:{match[2]}: {what}" if match else what)
    return found


def _where(stack) -> str:
    if not stack:
        return ""
    frame = stack[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}: "


def graph_break_error(gm, cause: Exception):
    """A ``GraphBreakError`` for a backend that received a fragment, or None when nothing says
    the graph is one (then ``cause`` stands)."""
    from mpm_fx.errors import GraphBreakError

    reason = fragment_reason(gm) or next(reversed(untraced_constructs()), None)
    if reason is None:
        return None
    return GraphBreakError(
        f"mpm_inductor received a fragment of the model, not its whole encoder "
        f"({str(cause).split(';')[0].rstrip('.')}): "
        f"dynamo broke the graph at {reason}. Merging needs the encoder in one graph: "
        "compile mpm_fx.optimize(model, schedule) (one graph even where dynamo cannot trace "
        "the model's forward, e.g. a branch on its own buffers), or pass fullgraph=True to "
        "torch.compile to see dynamo's own error")
