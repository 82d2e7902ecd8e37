"""``mpm_tensorrt``: the MPM pass on dynamo's graph, then torch-tensorrt's dynamo backend.

    torch.compile(model, backend="mpm_tensorrt", options={"schedule": (2, 5), ...})

UNTESTED in this workplace: TensorRT's libraries come only from NVIDIA's package index. What is
ours is tested without it: ``tensorrt_plan`` decides which ops stay in PyTorch and the token
ranges the engines after each merge must accept.

- The merge (similarity, argmax, ``nonzero``, cumsum, gathers) and the reconstruction gathers
  run in PyTorch between TensorRT engines: their ops go to ``torch_executed_ops``. Everything
  else (the blocks) is left to TensorRT's partitioner.
- The token dim of every engine after a merge is data-dependent. torch-tensorrt takes the range
  of such a symbol from the shape environment, which holds the ``torch._check`` bounds the merge
  states (ceil(N/2) <= M <= N); ``tensorrt_plan`` computes the same ranges so they can be
  checked and printed. Other options go to torch-tensorrt's ``CompilationSettings``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpm_fx import ops
from mpm_fx.backends._common import allow_data_dependent_shapes, split_options
from mpm_fx.passes import Program, rewrite_dynamo_graph

__all__ = ["mpm_tensorrt", "tensorrt_plan", "TensorRTPlan", "MERGE_OPS"]

aten = torch.ops.aten

# The ops only the merge and the reconstruction use: the data-dependent count (nonzero), the
# first-index argmax, the pairing (gather, scatter, cumsum, index_select) and the row gathers
# (index). They run in PyTorch, so each merge is one PyTorch segment between engines.
# masked_fill stays out of the list: the padding mask of later attentions uses it, and it
# belongs in their engines.
MERGE_OPS = frozenset({
    "torch.ops.aten.nonzero.default",
    "torch.ops.aten.cumsum.default",
    "torch.ops.aten.index.Tensor",
    "torch.ops.aten.gather.default",
    "torch.ops.aten.index_select.default",
    "torch.ops.aten.scatter.src",
    "torch.ops.aten.max.dim",
})
_PYTHON_STEPS = (ops.merge, ops.compose, ops.reconstruct)


@dataclass(frozen=True)
class TensorRTPlan:
    torch_executed_ops: frozenset  # op names torch-tensorrt must leave to PyTorch
    token_ranges: tuple  # per merge: (min, max) tokens (prefix included) the next engine gets
    pytorch_steps: int  # merge / compose / reconstruct calls in the graph (PyTorch segments)


def tensorrt_plan(program: Program) -> TensorRTPlan:
    """Partitioning decisions and token ranges for one rewritten program."""
    encoder = program.encoder
    steps = sum(1 for n in program.gm.graph.nodes if n.op == "call_function"
                and n.target in _PYTHON_STEPS)
    # The merge's own torch._check bounds: M <= N always (an image may have no mutual pair),
    # and ceil(N/2) <= M for the first merge (no valid mask yet); a later merge takes the
    # previous valid mask and only guarantees M >= 1.
    P, N0 = encoder.prefix_tokens, encoder.image_tokens
    ranges = tuple((P + ((N0 + 1) // 2 if i == 0 else 1), P + N0)
                   for i in range(len(program.schedule)))
    return TensorRTPlan(MERGE_OPS, ranges, steps)


def mpm_tensorrt(gm, example_inputs, options=None):
    torch_tensorrt_backend = _torch_tensorrt_backend()
    schedule, size_aware, trt_options = split_options(options)
    program = rewrite_dynamo_graph(gm, example_inputs, schedule, size_aware=size_aware)
    plan = tensorrt_plan(program)
    trt_options["torch_executed_ops"] = set(trt_options.get("torch_executed_ops", ())) | set(
        plan.torch_executed_ops)
    allow_data_dependent_shapes()
    return torch_tensorrt_backend(program.gm, example_inputs, options=trt_options)


def _torch_tensorrt_backend():
    try:
        from torch_tensorrt.dynamo.backend import torch_tensorrt_backend
    except ImportError as e:
        raise ImportError(
            "backend='mpm_tensorrt' needs torch-tensorrt and TensorRT: pip install "
            "mpm-fx[tensorrt] (TensorRT's libraries come from NVIDIA's package index, "
            "https://pypi.nvidia.com). backend='mpm_inductor' needs neither.") from e
    return torch_tensorrt_backend
