"""Compiler backends of mpm_fx (installed as ``mpm_fx.backends``). Each is thin: it runs the pass
pipeline of ``mpm_fx.passes`` and hands the rewritten graph to an existing compiler.

- ``mpm_inductor``: ``torch.compile(model, backend="mpm_inductor", options={"schedule": (2, 5)})``
  (registered through the ``torch_dynamo_backends`` entry point) -> Inductor;
- ``aot_compile``: ``torch.export`` + AOTInductor -> a ``.pt2`` that runs without Python model
  code (CPU, e.g. a Raspberry Pi 5);
- ``export_onnx``: ``torch.export`` + ``torch.onnx`` -> an ONNX file for ONNX Runtime (CPU, edge
  runtimes, TensorRT's ``trtexec``), without mpm_fx or torch;
- ``mpm_tensorrt``: ``backend="mpm_tensorrt"`` -> torch-tensorrt's dynamo backend for every
  segment between the merges and gathers, which stay in PyTorch (untested here: no TensorRT in
  this workplace).
"""

from mpm_fx.backends.aot import aot_compile
from mpm_fx.backends.inductor import mpm_inductor
from mpm_fx.backends.onnx import ONNXExportError, export_onnx
from mpm_fx.backends.tensorrt import mpm_tensorrt, partition, tensorrt_plan

__all__ = ["mpm_inductor", "aot_compile", "export_onnx", "ONNXExportError", "mpm_tensorrt",
           "tensorrt_plan", "partition"]
