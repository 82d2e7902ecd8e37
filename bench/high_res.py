"""Merges at high resolution: how their cost grows with the tokens, per merge method, on the real
DINOv2-S/14 (the numbers of docs/benchmarks.md, "High resolution").

    python -m mpm_fx.bench.high_res [--sizes 448,672,896,896x1792] [--repeats 5]
        [--photos 4] [--json bench/results/high_res.json] [--plot bench/results/high_res.png]

Per input size (a side, or HxW; 896x1792 is 64 x 128 = 8,192 tokens, Cityscapes-shaped):

1. **One merge beside one block**: every method's merge of the real tokens at the input of
   block 2 (all image tokens), and one encoder block on them, interleaved, eager; with
   ``--compile``, both compiled by Inductor too (the block with dynamic shapes, the merge with
   the static shapes of a first merge). Peak live memory of the eager merge.
2. **Share of the merged model's time in merges**, for each schedule of ``--schedules`` and each
   method of ``--share-methods``, at the sizes of ``--share-sizes``: the optimized model on one
   photo, and every merge call of that run again alone with its recorded inputs, in the same
   interleaved rounds: share = sum of the merges / the model. Eager, and under
   ``mpm_inductor`` with ``--compile`` (the merges compiled alone as in the model: the first
   with static shapes, later ones of the methods that pad with an unbacked token count and no
   padding mask, as ``mpm_fx.costs`` times them).
3. **Fidelity** of each of ``--share-methods`` at each schedule over ``--photos`` photos: pixel agreement with
   the unmerged model and with global MPM at the same schedule.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
from tabulate import tabulate
from torch import fx

import mpm_fx
from mpm_fx.bench.memory import peak_tensor_bytes
from mpm_fx.bench.models import focus
from mpm_fx.bench.models.photos import NAMES, photos
from mpm_fx.fidelity import compare
from mpm_fx.methods import merging
from mpm_fx.passes import rewrite
from mpm_fx.passes.graph import MARK

from .common import interleaved, median_ms, start_script, write_json

METHODS = {"mpm": {}, "local": {"method": "local"}, "tome": {"method": "tome"},
           "forest": {"method": "forest"}}
EVERY = tuple(range(12))


def op_cost(model, x, methods: list, repeats: int, compiled: bool) -> list:
    """One merge of each method on the real block-2 input tokens, one block beside it."""
    block, hidden = model.backbone.blocks[2], _block_input(model, x)
    N = hidden.shape[1] - 1
    side = _grid(model, x)
    calls = {name: _one_merge(name, hidden, N, side) for name in methods}
    rows = []
    modes = {"eager": (block, calls)}
    if compiled:
        modes["inductor"] = (torch.compile(copy.deepcopy(block), dynamic=True),
                             {k: torch.compile(f, fullgraph=True, dynamic=False)
                              for k, f in calls.items()})
    with torch.inference_mode():
        for mode, (run_block, merges) in modes.items():
            times = interleaved({"block": lambda b=run_block: b(hidden)}
                                | {k: (lambda f=f: f(hidden)) for k, f in merges.items()},
                                repeats)
            b = median_ms(times["block"])
            for name in methods:
                m = median_ms(times[name])
                row = {"tokens": N, "method": name, "mode": mode, "block_ms": round(b, 2),
                       "merge_ms": round(m, 3), "merge_over_block": round(m / b, 4)}
                if mode == "eager":
                    peak, _ = peak_tensor_bytes(lambda f=calls[name]: f(hidden))
                    row["peak_MiB"] = round(peak / 2**20, 1)
                rows.append(row)
    return rows


def _one_merge(name, hidden, N, grid):
    if name == "mpm":
        return lambda t: mpm_fx.merge(t, prefix=1)
    if name == "local":
        from mpm_fx.methods import local

        return lambda t: local.merge(t, prefix=1, grid=grid)
    from mpm_fx.methods import forest, tome

    op = {"tome": tome, "forest": forest}[name].merge
    return lambda t: op(t, prefix=1, r=N // 5)


def merge_share(model, x, schedule, options, repeats: int, compiled: bool) -> dict:
    """Share of one merged run's time spent in its merges, eager (and compiled)."""
    program = rewrite(model, (x,), {}, schedule, token_counts=False,
                      method=merging(schedule=schedule, **_counted(options, model, x, schedule)))
    calls = recorded_merges(program, x)
    optimized = mpm_fx.optimize(model, schedule, **_counted(options, model, x, schedule))
    out = {}
    runners = {"eager": (lambda: optimized(x), [(op, a, k) for op, a, k in calls])}
    if compiled:
        merged = torch.compile(copy.deepcopy(model), backend="mpm_inductor", dynamic=False,
                               options={"schedule": schedule,
                                        **_counted(options, model, x, schedule)})
        merges = []
        padded = merging(**_counted(options, model, x, schedule)).pads
        for i, (op, args, kwargs) in enumerate(calls):
            f = torch.compile(op, fullgraph=True, dynamic=False)
            if i and padded:  # later merges: the token count is data-dependent in the model
                args = (args[0].clone(), None)  # (as the cost model times them: no mask)
                torch._dynamo.decorators.mark_unbacked(args[0], 1)
            merges.append((f, args, kwargs))
        with torch.inference_mode():
            merged(x)
        runners["inductor"] = (lambda: merged(x), merges)
    with torch.inference_mode():
        for mode, (run, merges) in runners.items():
            fns = {"model": run} | {i: (lambda f=f, a=a, k=k: f(*a, **k))
                                    for i, (f, a, k) in enumerate(merges)}
            times = interleaved(fns, repeats)
            model_ms = median_ms(times["model"])
            merges_ms = sum(median_ms(times[i]) for i in range(len(merges)))
            out[mode] = {"model_ms": round(model_ms, 1), "merges_ms": round(merges_ms, 2),
                         "share": round(merges_ms / model_ms, 4)}
    return out


def recorded_merges(program, x) -> list:
    """(op, args, kwargs) of every merge call of one run of the program, with real values."""
    calls = []

    class Record(fx.Interpreter):
        def run_node(self, node):
            if node.op == "call_function" and node.meta.get(MARK) == "merge" \
                    and getattr(node.target, "__name__", "") == "merge":
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                calls.append((node.target, tuple(a.clone() if isinstance(a, torch.Tensor) else a
                                                 for a in args),
                              {k: v.clone() if isinstance(v, torch.Tensor) else v
                               for k, v in kwargs.items()}))
            return super().run_node(node)

    with torch.inference_mode():
        Record(program.gm).run(x)
    return calls


def _counted(options, model, x, schedule) -> dict:
    """r for the methods with a fixed count: a fifth of the tokens at every merge."""
    if options.get("method") not in ("tome", "forest"):
        return dict(options)
    N = _image_tokens(model, x)
    rs = []
    for _ in schedule:
        rs.append(N // 5)
        N -= rs[-1]
    return {**options, "r": tuple(rs)}


def fidelity(model, x, schedule, methods) -> dict:
    """Pixel agreement with the unmerged model and with global MPM, mean over the photos."""
    with torch.inference_mode():
        plain = [model(x[i:i + 1]) for i in range(len(x))]
        outputs = {}
        for name in methods:
            optimized = mpm_fx.optimize(model, schedule, **_counted(METHODS[name], model, x[:1],
                                                                    schedule))
            outputs[name] = [optimized(x[i:i + 1]) for i in range(len(x))]
    mean = lambda a, b: statistics.mean(  # noqa: E731
        compare(p, q)["pixel_agreement"] for p, q in zip(a, b))
    return {name: {"vs_unmerged": round(mean(plain, out), 4),
                   "vs_global_mpm": round(mean(outputs["mpm"], out), 4)}
            for name, out in outputs.items()}


def _block_input(model, x):
    seen = {}
    handle = model.backbone.blocks[2].register_forward_pre_hook(
        lambda m, a: seen.setdefault("x", a[0]))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    return seen["x"].clone()


def _image_tokens(model, x) -> int:
    return (x.shape[-2] // focus.PATCH) * (x.shape[-1] // focus.PATCH)


def _grid(model, x) -> tuple:
    return x.shape[-2] // focus.PATCH, x.shape[-1] // focus.PATCH


def _size(text: str):
    h, _, w = text.partition("x")
    return (int(h), int(w)) if w else int(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="448,672,896,896x1792")
    parser.add_argument("--methods", default="mpm,local,tome,forest")
    parser.add_argument("--schedules", default="0-11;2,5",
                        help="semicolon-separated; 0-11 means every block")
    parser.add_argument("--share-sizes", default="896",
                        help="the sizes (of --sizes) at which whole merged runs are timed")
    parser.add_argument("--share-methods", default="mpm,local",
                        help="the methods timed in whole runs and measured for fidelity "
                             "(mpm among them: fidelity is also against global MPM)")
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also under Inductor")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    info = start_script()
    # every merge call compiles the same op code for its own shapes: past dynamo's default of
    # 8 entries it would fail (fullgraph) or fall back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    methods = [m.strip() for m in args.methods.split(",")]
    share_methods = [m.strip() for m in args.share_methods.split(",")]
    if "mpm" not in share_methods:
        parser.error("--share-methods must include mpm (fidelity is measured against it)")
    share_sizes = [_size(s) for s in args.share_sizes.split(",")]
    schedules = [EVERY if s.strip() == "0-11" else tuple(int(k) for k in s.split(","))
                 for s in args.schedules.split(";")]
    result = {"header": info, "args": vars(args) | {"json": str(args.json),
                                                     "plot": str(args.plot)},
              "op_cost": [], "runs": []}
    for size in [_size(s) for s in args.sizes.split(",")]:
        model = focus.load(size)
        x = photos(NAMES[:args.photos], size)
        N = _image_tokens(model, x)
        print(f"\n{size} px: {N} image tokens", flush=True)
        result["op_cost"] += op_cost(model, x[:1], methods, args.repeats, args.compile)
        if size not in share_sizes:
            continue
        for schedule in schedules:
            quality = fidelity(model, x, schedule, share_methods)
            for name in share_methods:
                share = merge_share(model, x[:1], schedule, METHODS[name], args.repeats,
                                    args.compile)
                result["runs"].append({"size": size, "tokens": N, "schedule": list(schedule),
                                       "method": name, **quality[name], "time": share})
                print(f"  {schedule} {name}: {quality[name]}, {share}", flush=True)
    print(tabulate(result["op_cost"], headers="keys", tablefmt="github"))
    write_json(args.json, result)
    if args.plot:
        plot(result["op_cost"], args.plot)


def plot(rows: list, path: Path) -> None:
    """Merge time against tokens, log-log, one line per method and mode; blocks dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    names = list(dict.fromkeys(r["method"] for r in rows))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for i, name in enumerate(names):  # one colour per method, one line style per mode
            pts = sorted((r["tokens"], r["merge_ms"]) for r in rows
                         if r["method"] == name and r["mode"] == mode)
            ax.loglog(*zip(*pts), "o-" if mode == "eager" else "s:", color=f"C{i}",
                      label=f"{name} ({mode})")
        blocks = sorted({(r["tokens"], r["block_ms"]) for r in rows if r["mode"] == mode})
        ax.loglog(*zip(*blocks), "k--" if mode == "eager" else "k:", alpha=0.5,
                  label=f"one block ({mode})")
    ax.set_xlabel("image tokens")
    ax.set_ylabel("ms (median)")
    ax.set_title("One merge against one block, real DINOv2-S/14", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
