"""Exact peak of live tensor memory while a function runs, from the allocator's own events."""

from __future__ import annotations

from typing import Callable

import torch


def peak_tensor_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak bytes of tensors allocated by ``fn`` and alive at once, fn's result).

    Reads ``torch.profiler`` with profile_memory=True: each op event carries the bytes it
    allocated itself (net of what it freed inside), and ``[memory]`` events the frees between
    ops; summed in time order they give the live bytes. Tensors alive before the call do not
    count; the result does. A temporary made and freed inside one aten op is not seen.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, result
