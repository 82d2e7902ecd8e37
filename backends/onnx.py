"""``export_onnx``: the model with token merging as an ONNX file, for ONNX Runtime (and the
runtimes that read ONNX: TensorRT's ``trtexec``, OpenVINO, ...), without mpm_fx or torch::

    mpm_fx.export_onnx(model, example, "model.onnx", schedule=(2, 5))
    session = onnxruntime.InferenceSession("model.onnx")
    masks, = session.run(None, {session.get_inputs()[0].name: images})

The pass pipeline, then ``torch.export`` of the rewritten program and ``torch.onnx.export``
(the dynamo exporter; it needs ``onnxscript``). The merge is plain aten ops, so it lowers to
ONNX's own (``MatMul``, ``ReduceMax``, ``NonZero``, ``GatherElements``, ``ScatterElements``,
``TopK``, ...): MPM's merged token counts are data-dependent, dynamic dimensions of the graph
(the file runs on images whose counts differ from the example's); the methods that remove a
count (``tome``, ``forest``) have static shapes throughout. The input shapes, the batch size
included, are the example's: export one file per batch size (a padded batch runs each image as
it would alone, as everywhere in mpm_fx).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from mpm_fx.backends._common import exported_program
from mpm_fx.errors import MPMError
from mpm_fx.schedule import PAPER_SCHEDULE

__all__ = ["export_onnx", "ONNXExportError"]


class ONNXExportError(MPMError):
    """torch.onnx could not translate the merged program (an op with no ONNX form)."""


def export_onnx(model: nn.Module, example_inputs, path, schedule=PAPER_SCHEDULE, *,
                method="mpm", size_aware=None, opset: int | None = None,
                **method_options) -> Path:
    """Export ``model`` with token merging at the ``schedule`` blocks as an ONNX file at ``path``.

    example_inputs: a tensor or a tuple of positional inputs; the file takes inputs of these
                    shapes (the merged token counts inside are dynamic).
    method, size_aware, method_options: the merge method and its options (see
                    ``mpm_fx.optimize``); ``attention="varlen"`` is refused (mpm_fx's own op).
    opset:          the ONNX opset (default: torch.onnx's).
    An empty schedule exports the model as it is (the baseline to compare against). Raises
    ``ONNXExportError`` naming the op that has no ONNX form and what to try instead.
    """
    import importlib.util

    import torch

    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError("export_onnx needs onnxscript (torch.onnx's exporter) and onnx: pip "
                          "install 'mpm-fx[onnx]' (onnxruntime, to run the file, comes with it)")
    exported, args = exported_program(model, example_inputs, schedule, method=method,
                                      size_aware=size_aware, artefact="an ONNX file",
                                      **method_options)
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        program = torch.onnx.export(exported, args, dynamo=True, opset_version=opset,
                                    verbose=False)
    except Exception as e:  # torch.onnx wraps every failure in its own error types
        raise ONNXExportError(_explain(e, method)) from e
    program.save(str(path))
    return path


def _explain(error: Exception, method: str) -> str:
    """One paragraph: what torch.onnx could not translate, and the fixes."""
    text = str(error)
    node = next((line.strip() for line in text.splitlines()
                 if "call_function[target=" in line or "target=" in line), "")
    where = f" ({node[:200]})" if node else ""
    return (f"torch.onnx could not export the merged model{where}: {text.splitlines()[0][:300]}. "
            f"The merge of method {method!r} is plain aten ops; an op of the model itself may "
            "have no ONNX form in this torch. Try exporting the model unmerged "
            "(schedule=()) to see whether the model alone exports, another merge method, or "
            "mpm_fx.aot_compile for a .pt2 that runs without Python.")
