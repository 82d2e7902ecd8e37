"""Host side, after emulation: the emulated packages' outputs against the x86 eager reference.

    python -m mpm_fx.bench.pi5.compare DIR [--json bench/results/pi5_emulated.json]

Passes when each package matches its x86 eager counterpart within ``TOLERANCE`` (max absolute
difference, float32) and the merged package really merged: its output is further from the
unmerged reference than the tolerance (eager merging moves it by far more).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TOLERANCE = 1e-3  # float32, another CPU's kernels, compiled vs eager: ~1e-5 seen; a flipped
# pair moves a segmentation logit by ~1e-2 or more


def compare(reference: dict, emulated: dict, *, tolerance: float = TOLERANCE) -> dict:
    """The figures of one emulated run against the x86 reference (dicts as saved by
    ``reference.py`` and ``run_packages.py``)."""
    out = emulated["outputs"]
    diff = {name: (out[name] - reference[name]).abs().max().item() for name in ("unmerged",
                                                                               "merged")}
    merging_moves = (reference["merged"] - reference["unmerged"]).abs().max().item()
    package_moves = (out["merged"] - reference["unmerged"]).abs().max().item()
    checks = {
        "unmerged_matches_x86_eager": diff["unmerged"] <= tolerance,
        "merged_matches_x86_eager": diff["merged"] <= tolerance,
        "merged_package_merged": package_moves > tolerance and merging_moves > tolerance,
        "packages_ran_without_mpm_fx": not emulated["mpm_fx_imported"],
    }
    return {"tolerance_max_abs": tolerance, "max_abs_diff": diff,
            "merged_vs_unmerged_max_abs": {"x86_eager": merging_moves,
                                           "emulated_package": package_moves},
            "token_counts_x86_eager": reference["token_counts"], "checks": checks,
            "passed": all(checks.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--extra", default="{}", help="JSON object merged into the result")
    args = p.parse_args(argv)
    reference = torch.load(args.dir / "reference.pt", weights_only=False)
    emulated = torch.load(args.dir / "emulated.pt", weights_only=False)
    result = {"model": reference["spec"], "photos": reference["photos"],
              "x86_torch": reference["torch"], **compare(reference, emulated)}
    build = args.dir / "build.json"
    if build.exists():
        result["emulated"] = json.loads(build.read_text())
    result["emulated_run_s"] = emulated["run_s"]
    result.update(json.loads(args.extra))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
