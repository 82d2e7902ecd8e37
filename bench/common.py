"""Shared benchmark plumbing: an honest header; timing is ``mpm_fx.costs.interleaved``
(milliseconds, every function once per round)."""

from __future__ import annotations

import json
import os
import platform
import statistics

import torch

from mpm_fx.costs import interleaved  # noqa: F401 (the one timing loop, re-exported)

from .allocator import TUNABLES, allocator_state, quiet_torch, set_allocator_thresholds


class UsageError(Exception):
    """A bad argument found after parsing (a model that cannot be imported): one line, exit 2."""


NOISY_SPREAD = 0.25  # p10-p90 spread above this fraction of the median: an unsteady timing


def header(device="cpu", dtype=torch.float32) -> dict:
    """Machine, versions, threads, allocator settings, and the device and dtype a run uses:
    printed above every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    allocator = allocator_state()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(unset)"),
        "allocator": allocator["how"],
        "allocator_tunables_set": bool(allocator.get("trim_threshold")),
        "load_average": round(os.getloadavg()[0], 2),
        **device_info(device, dtype),
    }


def device_info(device="cpu", dtype=torch.float32) -> dict:
    """What a timing on ``device`` depends on besides the CPU: the device's name, the CUDA
    version, the dtype and float32 matmul precision."""
    device = torch.device(device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    return {"device": name, "dtype": str(dtype).removeprefix("torch."),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "matmul_precision": torch.get_float32_matmul_precision()}


def synchronizer(device):
    """What to call before a clock read so that a timing includes the device's queued work."""
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def start_script() -> dict:
    """What a benchmark run as ``python -m mpm_fx.bench.<script>`` does first (``mpm-bench``
    does the same in its entry point): the allocator thresholds, torch's warnings quiet, and the
    header printed. Returns the header."""
    set_allocator_thresholds()
    quiet_torch()
    info = header()
    print_header(info)
    return info


def print_header(info: dict) -> None:
    for key, value in info.items():
        print(f"# {key}: {value}")
    if not info["allocator_tunables_set"]:
        print(f"# note: the allocator thresholds are not set (GLIBC_TUNABLES={TUNABLES}); "
              "timings are noisier")
    if info["load_average"] > info["cores"]:
        print(f"# warning: load average {info['load_average']} on {info['cores']} cores: other "
              "jobs are running, timings will be noisy")


def steadiness(samples_ms: list[float]) -> dict:
    """Whether a timing can be trusted: the p10-p90 spread as a fraction of the median, the
    load average now, and a note when either is too high (with what to do)."""
    p10, p90 = p10_p90_ms(samples_ms)
    spread = (p90 - p10) / statistics.median(samples_ms)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    reasons = []
    if spread > NOISY_SPREAD:
        reasons.append(f"p10-p90 spread {spread:.0%} of the median")
    if load > cores:
        reasons.append(f"load average {load:.1f} on {cores} cores")
    note = ("noisy: " + ", ".join(reasons) + "; rerun on an idle machine or with more "
            "--repeats") if reasons else ""
    return {"spread": spread, "load_average": load, "steady": not reasons, "note": note}


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
