"""The ``mpm-bench`` command line: subcommands run (default), tune, gate, eval-ade20k, report."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

COMMANDS = ("run", "tune", "gate", "eval-ade20k", "report")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv  # `mpm-bench --photos 2` means `mpm-bench run --photos 2`
    p = argparse.ArgumentParser(prog="mpm-bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    _require_bench_extra()

    from . import ade20k, gate, report, run

    r = sub.add_parser("run", help="models x schedules x backends x batch sizes (default)",
                       description=run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_arguments(r)
    r.set_defaults(func=run.main)

    t = sub.add_parser("tune", help="mpm_fx.tune on the real model")
    t.add_argument("--size", type=int, default=448)
    t.add_argument("--photos", type=int, default=4)
    t.add_argument("--min-fidelity", type=float, default=0.97)
    t.add_argument("--repeats", type=int, default=10)
    t.add_argument("--rank", choices=("cost_model", "measured"), default="cost_model")
    t.add_argument("--json", type=Path)
    t.set_defaults(func=_tune)

    g = sub.add_parser("gate", help="the CI regression gate", description=gate.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    gate.add_arguments(g)
    g.set_defaults(func=gate.main)

    e = sub.add_parser("eval-ade20k", help="ADE20K mIoU of a Segmenter checkpoint, with MPM",
                       description=ade20k.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ade20k.add_arguments(e)
    e.set_defaults(func=ade20k.main)

    o = sub.add_parser("report", help="docs/benchmarks.md from bench/results/*.json",
                       description=report.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(o)
    o.set_defaults(func=report.main)

    args = p.parse_args(argv)
    # torch's own deprecation notices from inside Inductor's lowering, not ours
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    outcome = args.func(args)
    return outcome if isinstance(outcome, int) else 0


def _require_bench_extra() -> None:
    import importlib.util

    missing = [m for m in ("timm", "tabulate", "tqdm", "matplotlib", "onnx", "skimage")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"mpm-bench needs the bench extra ({', '.join(missing)} missing): "
                         "pip install 'mpm-fx[bench]' (from a checkout: pip install -e '.[bench]')")


def _tune(args) -> int:
    import dataclasses
    import time

    import mpm_fx
    from mpm_fx.bench.models import focus
    from mpm_fx.bench.models.photos import NAMES, photos

    from .common import header, print_header, write_json

    info = header()
    print_header(info)
    model = focus.load(args.size)
    x = photos(NAMES[:args.photos], args.size)
    start = time.perf_counter()
    result = mpm_fx.tune(model, x, {"min_fidelity": args.min_fidelity}, repeats=args.repeats,
                         rank=args.rank)
    seconds = time.perf_counter() - start
    print(f"\n{result}\n\nsearch took {seconds:.0f} s for {len(result.table)} schedules")
    write_json(args.json, {
        "header": info, "size": args.size, "photos": list(NAMES[:args.photos]),
        "budget": result.budget, "rank": result.rank, "schedule": result.schedule,
        "baseline_ms": result.baseline_ms, "measured": result.measured, "search_s": seconds,
        "costs": dataclasses.asdict(result.costs) if result.costs else None,
        "table": [dataclasses.asdict(c) for c in result.table]})
    return 0
