"""Shared benchmark plumbing: an honest header and interleaved timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def header() -> dict:
    """Machine, versions, threads and allocator settings: printed above every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(unset)"),
        "allocator_tunables_set": os.environ.get("GLIBC_TUNABLES") == TUNABLES,
    }


def print_header(info: dict) -> None:
    for key, value in info.items():
        print(f"# {key}: {value}")
    if not info["allocator_tunables_set"]:
        print(f"# note: set GLIBC_TUNABLES={TUNABLES} to remove most allocator noise on these VMs")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Run every fn once per round, round after round, so drift hits all alike; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3
