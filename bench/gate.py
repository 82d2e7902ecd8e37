"""``mpm-bench gate``: the CI regression gate.

Runs a small benchmark (the real DINOv2-S/14 at low resolution, a few photos) and fails (exit
1) when a ratio falls past the thresholds stored in ``bench/gate.json``:
- latency ratio merged / unmerged, per backend (median of interleaved rounds, same process);
- fidelity against the unmerged model: mean pixel agreement of the mask at 0.5 and the k-means
  class mIoU over the photos (eager, batch 1).
Only ratios are gated, never absolute times, which differ between machines. The benchmark runs
``runs`` times (gate.json), each with its own rounds, and the median of each value is gated: on
the 2-core VMs the eager ratio of one run moved between 0.74 and 0.86 on one Intel machine.

``--measure K`` runs the benchmark K times and prints the spread and the thresholds it would
suggest (worst single run, widened by the margin in gate.json): how gate.json was set, on an
AMD and an Intel machine, the looser of the two kept.
"""

from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path

import torch

import mpm_fx
from mpm_fx.bench.models.photos import photos

from .common import header, interleaved, print_header, write_json
from .run import fidelity_table, load_model, make_runner


def load_gate(path: Path | None) -> dict:
    if path is None:
        return json.loads(resources.files("mpm_fx.bench").joinpath("gate.json").read_text())
    return json.loads(Path(path).read_text())


def measure(gate: dict) -> dict:
    """One run of the gate's benchmark: {"<backend>_latency_ratio": r, "pixel_agreement": a,
    "kmeans_miou": m}."""
    import tempfile

    model = load_model(gate["model"], gate["size"])
    x = photos(gate["photos"], gate["size"])
    schedule = tuple(gate["schedule"])
    report = mpm_fx.optimize(model, schedule, example_inputs=x[:1]).mpm_report()
    table, _, _ = fidelity_table(model, x, gate["photos"], [schedule], report, gate["classes"])
    fidelity = table[str(schedule)]
    out = {"pixel_agreement": fidelity["pixel_agreement"], "kmeans_miou": fidelity["kmeans_miou"],
           "tokens": fidelity["tokens"]}
    tmp = Path(tempfile.mkdtemp(prefix="mpm-gate-"))
    x1 = x[:1]
    with torch.inference_mode():
        for backend in gate["backends"]:
            base, merged = (make_runner(model, x1, s, backend, tmp) for s in ((), schedule))
            times = interleaved({"base": lambda: base(x1), "merged": lambda: merged(x1)},
                                gate["repeats"])
            out[f"{backend}_latency_ratio"] = (statistics.median(times["merged"])
                                               / statistics.median(times["base"]))
    return out


def check(values: dict, thresholds: dict) -> list:
    """[(name, measured, threshold, ok)]: keys "max_X" gate X from above, "min_X" from below."""
    rows = []
    for key, limit in thresholds.items():
        kind, name = key.split("_", 1)
        value = values[name]
        rows.append((name, value, f"{'<=' if kind == 'max' else '>='} {limit}",
                     value <= limit if kind == "max" else value >= limit))
    return rows


def main(args) -> int:
    from tabulate import tabulate

    gate = load_gate(args.thresholds)
    info = header()
    print_header(info)
    print(f"# gate: {gate['model']} at {gate['size']} px, schedule {tuple(gate['schedule'])}, "
          f"{len(gate['photos'])} photos, backends {gate['backends']}, "
          f"{gate['repeats']} interleaved rounds")
    if args.measure:
        runs = [measure(gate) for _ in range(args.measure)]
        keys = [k for k in runs[0] if k != "tokens"]
        margin = gate["margin"]
        suggested = {}
        for k in keys:
            values = [r[k] for r in runs]
            if k.endswith("latency_ratio"):
                suggested[f"max_{k}"] = round(max(values) + margin["latency_ratio"], 3)
            else:
                suggested[f"min_{k}"] = round(min(values) - margin["fidelity"], 3)
        print(tabulate([[k] + [f"{r[k]:.4f}" for r in runs] for k in keys],
                       headers=["measured"] + [f"run {i + 1}" for i in range(len(runs))]))
        print("\nsuggested thresholds:", json.dumps(suggested, indent=2))
        write_json(args.json, {"header": info, "runs": runs, "suggested": suggested})
        return 0
    runs = [measure(gate) for _ in range(gate.get("runs", 1))]
    values = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "tokens"}
    if len(runs) > 1:
        print(f"# the median of {len(runs)} runs (each its own rounds) is gated")
    rows = check(values, gate["thresholds"])
    print(tabulate([[n, f"{v:.4f}", t, "ok" if ok else "FAIL"] for n, v, t, ok in rows],
                   headers=["check", "measured", "threshold", ""]))
    write_json(args.json, {"header": info, "values": values, "runs": runs, "checks": rows})
    failed = [r for r in rows if not r[3]]
    if failed:
        print(f"\ngate FAILED: {', '.join(r[0] for r in failed)}. If the change is meant to "
              "cost this, re-measure with `mpm-bench gate --measure 5` on the CI machine and "
              "update bench/gate.json in the same commit, saying why.")
        return 1
    print("\ngate passed")
    return 0
