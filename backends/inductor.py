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
"""

from __future__ import annotations

from mpm_fx.backends._common import PROGRAMS, allow_data_dependent_shapes, log, split_options
from mpm_fx.errors import NoAttentionFound
from mpm_fx.passes import rewrite_dynamo_graph

__all__ = ["mpm_inductor"]


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
    try:
        program = rewrite_dynamo_graph(gm, example_inputs, schedule, method=method)
    except NoAttentionFound:
        # A graph break split the model and this piece has no transformer: nothing to merge.
        log.warning("mpm_inductor: a graph without attention (%d nodes) compiled without "
                    "merging; use fullgraph=True to make sure the encoder is one graph",
                    len(gm.graph.nodes))
        return compile_fx(gm, example_inputs, config_patches=inductor_options or None)
    allow_data_dependent_shapes()
    return compile_fx(program.gm, example_inputs, config_patches=inductor_options or None)
