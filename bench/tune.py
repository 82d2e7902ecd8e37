"""``mpm-bench tune``: ``mpm_fx.tune`` on the real DINOv2-S/14 and real photos, then the chosen
setting timed against the unmerged model on each ``--confirm`` backend (interleaved rounds)."""

from __future__ import annotations

import dataclasses
import time

__all__ = ["main"]


def main(args) -> int:
    import mpm_fx
    from mpm_fx.bench.models import focus
    from mpm_fx.bench.models.photos import NAMES, photos

    from .common import header, print_header, write_json
    from .progress import Stages

    info = header()
    print_header(info)
    stages = Stages(2)
    with stages(f"loading the real model at {args.size} px (converted once, then cached)"):
        model = focus.load(args.size)
        x = photos(NAMES[:args.photos], args.size)
    with stages(f"searching {', '.join(args.methods)} with pixel agreement >= "
                f"{args.min_fidelity}"):
        start = time.perf_counter()
        result = mpm_fx.tune(model, x, {"min_fidelity": args.min_fidelity},
                             repeats=args.repeats, rank=args.rank, methods=args.methods,
                             fractions=args.fractions, recalibrate=args.recalibrate)
        seconds = time.perf_counter() - start
    print(f"\n{result}\n\nsearch took {seconds:.0f} s for {len(result.table)} settings")
    confirmed = {}
    if result.best is not None:
        for backend in args.confirm:
            with stages(f"timing the chosen setting on {backend}"):
                confirmed[backend] = confirm(model, x[:1], result.options(), backend,
                                             args.repeats)
            print(f"    {backend}: {confirmed[backend]['merged_ms']:.1f} vs "
                  f"{confirmed[backend]['unmerged_ms']:.1f} ms, "
                  f"{confirmed[backend]['speedup']:.2f}x")
    write_json(args.json, {
        "header": info, "size": args.size, "photos": list(NAMES[:args.photos]),
        "budget": result.budget, "rank": result.rank, "schedule": result.schedule,
        "chosen": result.options(), "confirmed": confirmed, "methods": args.methods,
        "fractions": args.fractions,
        "baseline_ms": result.baseline_ms, "measured": result.measured, "search_s": seconds,
        "costs": dataclasses.asdict(result.costs) if result.costs else None,
        "front": [dataclasses.asdict(c) for c in result.front],
        "table": [dataclasses.asdict(c) for c in result.table]})
    return 0


def confirm(model, x, setting: dict, backend: str, repeats: int) -> dict:
    """The chosen setting against the unmerged model on ``backend`` (eager or Inductor), in
    the same interleaved rounds."""
    import copy
    import statistics

    import torch

    import mpm_fx
    from mpm_fx.costs import interleaved

    setting = dict(setting)
    schedule = setting.pop("schedule")
    if backend == "eager":
        base, merged = model, mpm_fx.optimize(model, schedule, **setting)
    else:
        base = torch.compile(copy.deepcopy(model), backend="inductor", dynamic=False)
        merged = torch.compile(copy.deepcopy(model), backend="mpm_inductor", dynamic=False,
                               options={"schedule": schedule, **setting})
    with torch.inference_mode():
        times = interleaved({"base": lambda: base(x), "merged": lambda: merged(x)}, repeats)
    b, m = statistics.median(times["base"]), statistics.median(times["merged"])
    return {"unmerged_ms": b, "merged_ms": m, "speedup": b / m}
