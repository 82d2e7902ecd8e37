"""``mpm-bench tune``: ``mpm_fx.tune`` on the real DINOv2-S/14 and real photos."""

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
    with stages(f"searching a schedule with pixel agreement >= {args.min_fidelity}"):
        start = time.perf_counter()
        result = mpm_fx.tune(model, x, {"min_fidelity": args.min_fidelity},
                             repeats=args.repeats, rank=args.rank)
        seconds = time.perf_counter() - start
    print(f"\n{result}\n\nsearch took {seconds:.0f} s for {len(result.table)} schedules")
    write_json(args.json, {
        "header": info, "size": args.size, "photos": list(NAMES[:args.photos]),
        "budget": result.budget, "rank": result.rank, "schedule": result.schedule,
        "baseline_ms": result.baseline_ms, "measured": result.measured, "search_s": seconds,
        "costs": dataclasses.asdict(result.costs) if result.costs else None,
        "table": [dataclasses.asdict(c) for c in result.table]})
    return 0
