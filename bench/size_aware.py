"""Plain MPM vs size-aware attention on the real DINOv2-S/14: fidelity and latency.

    python -m bench.size_aware [--size 448] [--photos 16] [--repeats 8] [--no-compile]
                               [--json bench/results/size_aware.json]

For the paper's schedule (2, 5) and an aggressive one (2, 4, 6, 8, 10), plain and size-aware:
fidelity against the unmerged model over real photos (mean absolute error of the saliency,
pixel agreement and IoU of the mask at 0.5), and batch-1 latency (eager, and mpm_inductor
unless --no-compile), interleaved with the unmerged model in one process (median).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import mpm_fx
from mpm_fx.bench.models import focus
from mpm_fx.bench.models.photos import NAMES, photos
from mpm_fx.fidelity import mean_scores, score_images

from .common import interleaved, median_ms, start_script, write_json

SCHEDULES = {"(2, 5)": (2, 5), "(2, 4, 6, 8, 10)": (2, 4, 6, 8, 10)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--photos", type=int, default=16, help=f"how many of {len(NAMES)} photos")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--no-compile", action="store_true", help="eager latency only")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    info = start_script()
    model = focus.load(args.size)
    x = photos(NAMES[:args.photos], args.size)
    variants = {(name, aware): mpm_fx.optimize(model, sched, size_aware=aware)
                for name, sched in SCHEDULES.items() for aware in (False, True)}

    rows, result = [], {"header": info, "size": args.size, "photos": list(NAMES[:args.photos]),
                        "variants": {}}
    with torch.inference_mode():
        base = [model(x[i:i + 1]) for i in range(len(x))]
        for (name, aware), optimized in tqdm(variants.items(), desc="fidelity", leave=False):
            mean = mean_scores(score_images(base, optimized, list(x.split(1))))
            del mean["tokens"]
            result["variants"][f"{name} {'size-aware' if aware else 'plain'}"] = {"fidelity": mean}

        x1 = x[:1]
        runs = {"unmerged": model}
        runs.update({f"{n} {'size-aware' if a else 'plain'}": o for (n, a), o in variants.items()})
        timings = {"eager": interleaved({k: (lambda f=f: f(x1)) for k, f in runs.items()},
                                        args.repeats)}
        if not args.no_compile:
            compiled = {"unmerged": torch.compile(model)}
            for name, sched in SCHEDULES.items():
                for aware in (False, True):
                    key = f"{name} {'size-aware' if aware else 'plain'}"
                    compiled[key] = torch.compile(
                        model, backend="mpm_inductor",
                        options={"schedule": sched, "size_aware": aware})
            for fn in tqdm(compiled.values(), desc="compiling", leave=False):
                fn(x1)  # compile outside the timing
            timings["mpm_inductor"] = interleaved(
                {k: (lambda f=f: f(x1)) for k, f in compiled.items()}, args.repeats)

    for key, entry in result["variants"].items():
        entry.update({f"{backend}_ms": median_ms(t[key]) for backend, t in timings.items()})
        f = entry["fidelity"]
        rows.append([key, f"{f['mae']:.4f}", f"{f['pixel_agreement']:.4f}", f"{f['iou']:.4f}"]
                    + [f"{entry[f'{b}_ms']:.0f} ({median_ms(t['unmerged']) / entry[f'{b}_ms']:.2f}x)"
                       for b, t in timings.items()])
    result["unmerged_ms"] = {b: median_ms(t["unmerged"]) for b, t in timings.items()}
    print(f"\nreal DINOv2-S/14, {args.size} px, {len(x)} photos, batch 1; latency median of "
          f"{args.repeats} interleaved rounds, unmerged: "
          + ", ".join(f"{b} {v:.0f} ms" for b, v in result["unmerged_ms"].items()))
    print(tabulate(rows, headers=["schedule", "MAE", "pixel agreement", "mask IoU"]
                   + [f"{b} ms (speed-up)" for b in timings]))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
