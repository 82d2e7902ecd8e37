"""Shared benchmark plumbing: an honest header; timing is ``mpm_fx.costs.interleaved``
(milliseconds, every function once per round)."""

from __future__ import annotations

import json
import os
import platform
import statistics

import torch

from mpm_fx.costs import interleaved  # noqa: F401 (the one timing loop, re-exported)

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


def median_ms(samples_ms: list[float]) -> float:
    return statistics.median(samples_ms)


def p10_p90_ms(samples_ms: list[float]) -> list[float]:
    """The 10th and 90th percentiles, interpolated between samples (never outside them: the
    default "exclusive" method of statistics.quantiles extrapolates below the smallest)."""
    if len(samples_ms) == 1:
        return [samples_ms[0], samples_ms[0]]
    q = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return [q[0], q[-1]]


def ratio_text(value, digits: int = 2) -> str:
    """A speed-up or bound for a table: "1.25x", or "n/a (noise)" for a missing estimate."""
    return "n/a (noise)" if value is None else f"{value:.{digits}f}x"


def write_json(path, data: dict) -> None:
    """Write the results next to the table, if a path was given (--json)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
