"""Shared benchmark plumbing: an honest header and interleaved timing."""

from __future__ import annotations

import json
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


def p10_p90_ms(samples: list[float]) -> list[float]:
    q = statistics.quantiles(samples, n=10)
    return [q[0] * 1e3, q[-1] * 1e3]


def write_json(path, data: dict) -> None:
    """Write the results next to the table, if a path was given (--json)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def speed_bound(block, dim: int, prefix: int, image_tokens: int, schedule: tuple, counts: list,
                depth: int, unmerged_ms: float, repeats: int) -> dict:
    """The speed-up merging can give at most, from the token counts it reached: one encoder
    block timed at every token count the merged model runs (interleaved, eager), plus one merge
    per scheduled block (timed at the full count: an upper bound on its cost); the rest of the
    model (embedding, decoder) does not shrink."""
    import mpm_fx

    tokens, n, merged = [], image_tokens, iter(counts)
    for j in range(depth):
        if j in schedule:
            n = next(merged)
        tokens.append(prefix + n)
    full = prefix + image_tokens
    xs = {t: torch.randn(1, t, dim) for t in sorted(set(tokens) | {full})}
    fns = {str(t): (lambda t=t: block(xs[t])) for t in xs}
    fns["merge"] = lambda: mpm_fx.merge(xs[full], prefix=prefix)
    with torch.inference_mode():
        cost = {k: median_ms(v) for k, v in interleaved(fns, repeats).items()}
    blocks_unmerged = depth * cost[str(full)]
    blocks_merged = sum(cost[str(t)] for t in tokens) + len(schedule) * cost["merge"]
    return {"block_ms": {k: v for k, v in cost.items() if k != "merge"},
            "merge_ms": cost["merge"],
            "encoder_bound": blocks_unmerged / blocks_merged,
            "model_bound": unmerged_ms / (unmerged_ms - blocks_unmerged + blocks_merged)}
