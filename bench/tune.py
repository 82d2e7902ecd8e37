"""``mpm-bench tune``: ``mpm_fx.tune`` on the real DINOv2-S/14, searching on the "search" photos
only; the chosen setting is then scored on photos the search never saw (the "check" half of
the repository's photos and the held-out photos of other wheels) and timed against the
unmerged model on each ``--confirm`` backend (interleaved rounds)."""

from __future__ import annotations

import dataclasses
import time

__all__ = ["main"]


def main(args) -> int:
    import mpm_fx
    from mpm_fx.bench.models import focus
    from mpm_fx.bench.models.photos import photo_set, photos
    from mpm_fx.fidelity import Judge

    from .common import header, print_header, write_json
    from .progress import Stages

    info = header()
    print_header(info)
    stages = Stages(3 + len(args.confirm))
    searched = photo_set("search")[:args.photos]
    checks = {name: photo_set(name) for name in args.check}
    with stages(f"loading the real model at {args.size} px (converted once, then cached)"):
        model = focus.load(args.size)
        x = photos(searched, args.size)
    with stages(f"searching {', '.join(args.methods)} with pixel agreement >= "
                f"{args.min_fidelity} on {len(searched)} photos"):
        start = time.perf_counter()
        result = mpm_fx.tune(model, x, {"min_fidelity": args.min_fidelity},
                             repeats=args.repeats, rank=args.rank, methods=args.methods,
                             fractions=args.fractions, recalibrate=args.recalibrate)
        seconds = time.perf_counter() - start
    print(f"\n{result}\n\nsearch took {seconds:.0f} s for {len(result.table)} settings, "
          f"on the photos {', '.join(searched)}")
    checked, confirmed = {}, {}
    if result.best is not None:
        with stages(f"scoring the chosen setting on photos the search never saw: "
                    f"{', '.join(checks)}"):
            for name, names in checks.items():
                judge = Judge(model, photos(names, args.size), names=names)
                checked[name] = judge.score(**result.setting())
        for name, scores in checked.items():
            print(f"    {name} ({', '.join(checks[name])}): pixel agreement "
                  f"{scores['pixel_agreement']:.4f}, mask IoU {scores['iou']:.3f}, k-means mIoU "
                  f"{scores['kmeans_miou']:.3f}")
        for backend in args.confirm:
            with stages(f"timing the chosen setting on {backend}"):
                confirmed[backend] = confirm(model, x[:1], result.setting(), backend,
                                             args.repeats)
            print(f"    {backend}: {confirmed[backend]['merged_ms']:.1f} vs "
                  f"{confirmed[backend]['unmerged_ms']:.1f} ms, "
                  f"{confirmed[backend]['speedup']:.2f}x")
    write_json(args.json, {
        "header": info, "size": args.size, "photos": list(searched),
        "checked_on": {k: list(v) for k, v in checks.items()}, "checked": checked,
        "budget": result.budget, "rank": result.rank, "schedule": result.schedule,
        "chosen": result.setting(), "confirmed": confirmed, "methods": args.methods,
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
