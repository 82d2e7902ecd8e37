"""Which attention kernel each attention of a model ran, from the profiler.

``scaled_dot_product_attention`` dispatches at run time to one of several kernels (on CUDA:
FlashAttention, memory-efficient, cuDNN, or the math fallback; on CPU: the fused flash kernel
for CPU or math), and a padding mask, a dtype or a head size can send it off the fast one. The
profiler records the ATen op each call dispatched to; the outermost SDPA-family op of each call
is that attention's kernel (the ops it calls inside, ``_flash_attention_forward`` for example,
are not counted again). The same names appear for eager, Inductor (which calls the ATen kernel
for attention) and AOTInductor packages (which call it through their C shim). An attention
written as explicit softmax (``q @ k^T``, ``softmax``, ``@ v``) is no SDPA call: none listed.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["KERNELS", "attention_kernels", "summary"]

# ATen op (as the profiler names it) -> short name
KERNELS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_attention_math_for_mps": "math (mps)",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
    "aten::_flash_attention_forward": "flash varlen",  # what varlen_attn calls, alone
    "aten::_efficient_attention_forward": "efficient varlen",
}


def attention_kernels(fn, *, device="cpu") -> list:
    """Run ``fn()`` once under the profiler; the kernel of every attention it ran, in order."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    events = [e for e in prof.events() if e.name in KERNELS]
    outer = [e for e in events if not _inside_one_of(e)]
    return [KERNELS[e.name] for e in sorted(outer, key=lambda e: e.time_range.start)]


def _inside_one_of(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in KERNELS:
            return True
        parent = parent.cpu_parent
    return False


def summary(kernels: list) -> str:
    """["flash (cpu)"] * 3 + ["math"] * 9 -> "flash (cpu) x3, math x9" (runs in order)."""
    if not kernels:
        return "none (no SDPA call)"
    return ", ".join(f"{name} x{len(list(run))}" for name, run in itertools.groupby(kernels))
