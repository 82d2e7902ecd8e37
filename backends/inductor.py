"""``mpm_inductor``: the MPM pass on dynamo's graph, then Inductor, as one graph.

    torch.compile(model, backend="mpm_inductor", options={"schedule": (2, 5)})

``options`` may also hold ``method`` (default "mpm") and its options (``r``, ``placement``,
``size_aware``, ...; ``mpm_fx.methods``); the others are Inductor config patches (as for
``backend="inductor"``). ``torch.compile(mpm_fx.optimize(model), backend="mpm_inductor")``
compiles the program the optimized module captured, as it is (its schedule and method): one
graph even for a model whose forward dynamo cannot trace whole (a Python branch on its own
buffers, which mpm_fx's capture specialises). The backend is
registered through the ``torch_dynamo_backends`` entry point, so the name works in a process
that never imported mpm_fx; ``backend=mpm_fx.backends.mpm_inductor`` works without installing.

Merging needs the encoder in one graph. Where dynamo breaks the model's graph (without
``fullgraph=True``), the backend receives fragments: one that ends at a break, or resumes after
one, is refused, and a fragment whose blocks do not hold the schedule is reported as what it is
(``GraphBreakError``: where dynamo broke, and the fix), not as a schedule error.
"""

from __future__ import annotations

from mpm_fx.backends._common import (
    PROGRAMS,
    allow_data_dependent_shapes,
    fragment_reason,
    graph_break_error,
    log,
    split_options,
    untraced_constructs,
)
from mpm_fx.errors import EncoderNotFound, GraphBreakError, NoAttentionFound, ScheduleError
from mpm_fx.passes import rewrite_dynamo_graph

__all__ = ["mpm_inductor"]

_WARNED: set = set()  # untraced constructs already warned about


def mpm_inductor(gm, example_inputs, options=None):
    from torch._inductor.compile_fx import compile_fx  # imported on use: it is heavy

    schedule, method, inductor_options = split_options(options)
    if PROGRAMS.active():
        # torch.compile(mpm_fx.optimize(model), backend="mpm_inductor"): the graph is the
        # program mpm_fx captured and rewrote (the way to one graph for a model whose forward
        # dynamo cannot trace whole, e.g. a branch on its own buffers): compiled as it is,
        # with the optimized module's own schedule and method.
        allow_data_dependent_shapes()
        return compile_fx(gm, example_inputs, config_patches=inductor_options or None)
    if schedule and fragment_reason(gm):  # merges counted from a fragment's first block
        raise GraphBreakError(str(graph_break_error(gm, "it ends at a graph break")))
    try:
        program = rewrite_dynamo_graph(gm, example_inputs, schedule, method=method)
    except NoAttentionFound:
        # A graph break split the model and this piece has no transformer: nothing to merge.
        log.warning("mpm_inductor: a graph without attention (%d nodes) compiled without "
                    "merging; use fullgraph=True to make sure the encoder is one graph",
                    len(gm.graph.nodes))
        return compile_fx(gm, example_inputs, config_patches=inductor_options or None)
    except (ScheduleError, EncoderNotFound) as e:
        error = graph_break_error(gm, e)
        if error is None:
            raise
        raise error from e
    untraced = untraced_constructs()
    if untraced and untraced[-1] not in _WARNED:  # a fragment that happens to hold the blocks
        _WARNED.add(untraced[-1])
        log.warning("mpm_inductor: dynamo could not trace %s in this process; if that is in "
                    "this model's forward, the graph merged here is a fragment of it (compile "
                    "mpm_fx.optimize(model) or pass fullgraph=True)", untraced[-1])
    allow_data_dependent_shapes()
    return compile_fx(program.gm, example_inputs, config_patches=inductor_options or None)
