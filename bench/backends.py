"""Eager vs mpm_inductor vs AOTInductor ``.pt2`` on the real DINOv2-S/14, each against the same
backend without merging, in one process, interleaved; plus compile times.

    python bench/backends.py [--size 448] [--schedule 2,5] [--repeats 10] [--photo astronaut]
                             [--json bench/results/backends_cpu.json]

Batch 1, float32, CPU. Compile time is the first call (Inductor: dynamo + pass + Inductor) or
``aot_compile`` (export + pass + AOTInductor), cold caches not enforced (Inductor's on-disk
cache may hold kernels of earlier runs; the table says which run was first).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mpm_fx  # noqa: E402
from bench.common import (header, interleaved, median_ms, p10_p90_ms, print_header,  # noqa: E402
                          write_json)
from mpm_fx.models import focus  # noqa: E402
from mpm_fx.models.photos import photo  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module="torch")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--schedule", default="2,5")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--photo", default="astronaut")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    schedule = tuple(int(k) for k in args.schedule.split(",") if k.strip())
    info = header()
    print_header(info)

    model = focus.load(args.size)
    x = photo(args.photo, args.size)
    runs, compile_s = {}, {}
    with torch.inference_mode():
        runs["eager"] = model
        runs["eager + MPM"] = mpm_fx.optimize(model, schedule, example_inputs=x)
        for name, backend, options in (("inductor", "inductor", None),
                                       ("mpm_inductor", "mpm_inductor", {"schedule": schedule})):
            compiled = torch.compile(copy.deepcopy(model), backend=backend, options=options)
            start = time.perf_counter()
            compiled(x)
            compile_s[name] = time.perf_counter() - start
            runs[name] = compiled
        tmp = Path(tempfile.mkdtemp())
        for name, sched in (("AOT .pt2", ()), ("AOT .pt2 + MPM", schedule)):
            start = time.perf_counter()
            package = mpm_fx.aot_compile(model, x, tmp / f"{len(sched)}.pt2", schedule=sched)
            compile_s[name] = time.perf_counter() - start
            runs[name] = torch._inductor.aoti_load_package(str(package))

        reference = model(x)
        error = {name: (fn(x) - reference).abs().max().item() for name, fn in runs.items()}
        times = interleaved({name: (lambda fn=fn: fn(x)) for name, fn in runs.items()},
                            args.repeats)

    pairs = (("eager", "eager + MPM"), ("inductor", "mpm_inductor"),
             ("AOT .pt2", "AOT .pt2 + MPM"))
    rows, result = [], {"header": info, "size": args.size, "schedule": list(schedule),
                        "photo": args.photo, "repeats": args.repeats, "backends": {}}
    for base, merged in pairs:
        b, m = median_ms(times[base]), median_ms(times[merged])
        rows.append([base, f"{b:.1f}", f"{m:.1f}", f"{b / m:.2f}x",
                     _fmt(compile_s.get(base)), _fmt(compile_s.get(merged)),
                     f"{error[merged]:.3f}"])
        result["backends"][base] = {
            "unmerged_ms": b, "merged_ms": m, "speedup": b / m,
            "unmerged_p10_p90_ms": p10_p90_ms(times[base]), "merged_p10_p90_ms": p10_p90_ms(times[merged]),
            "compile_s": compile_s.get(base), "compile_merged_s": compile_s.get(merged),
            "max_abs_diff_vs_unmerged_eager": error[merged]}
    print(f"\nreal DINOv2-S/14 + conv decoder, {args.size} px, {args.photo}, batch 1, schedule "
          f"{schedule}, median of {args.repeats} interleaved rounds")
    print(tabulate(rows, headers=["backend", "unmerged ms", "MPM ms", "speed-up",
                                  "compile s", "compile s (MPM)", "max |MPM - unmerged|"]))
    write_json(args.json, result)
    return result


def _fmt(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


if __name__ == "__main__":
    main()
