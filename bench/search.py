"""``mpm_fx.tune`` on the real DINOv2-S/14: the fastest schedule that keeps a fidelity target.

    python bench/search.py [--size 448] [--photos 4] [--min-fidelity 0.97] [--repeats 5]
                           [--json bench/results/search.json]

Greedy measured search (see ``mpm_fx.search``): fidelity = mean pixel agreement of the mask at
0.5 against the unmerged model over the calibration photos; latency eager, batch 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mpm_fx  # noqa: E402
from bench.common import header, print_header, write_json  # noqa: E402
from mpm_fx.models import focus  # noqa: E402
from mpm_fx.models.photos import NAMES, photos  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--min-fidelity", type=float, default=0.97)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    info = header()
    print_header(info)
    model = focus.load(args.size)
    x = photos(NAMES[:args.photos], args.size)
    start = time.perf_counter()
    result = mpm_fx.tune(model, x, {"min_fidelity": args.min_fidelity}, repeats=args.repeats)
    seconds = time.perf_counter() - start
    print(f"\n{result}\n\nsearch took {seconds:.0f} s for {len(result.table)} schedules")
    out = {"header": info, "size": args.size, "photos": list(NAMES[:args.photos]),
           "budget": result.budget, "schedule": result.schedule, "baseline_ms": result.baseline_ms,
           "search_s": seconds, "table": [dataclasses.asdict(c) for c in result.table]}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
