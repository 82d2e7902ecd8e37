"""``mpm-bench frontier``: fidelity against *measured* latency for every merge method over a sweep
of settings, the Pareto front of each method per backend, and which method is ahead at equal
latency (the product's headline: a user picks a setting by the fidelity it keeps at a speed).

Photos: ``search`` (the repository's photos of even index) is the only set any choice is made
on; ``check`` (the repository's photos of odd index) and ``held-out`` (16 photos from other
wheels, ``photos.HELD_OUT``) are scored only for the settings chosen. Stages:

1. every setting of the sweep (each method: schedules x removal fractions, or schedules alone
   for the methods that find their own count) scored on the search photos;
2. every setting timed eagerly, batch 1, interleaved with the unmerged model;
3. per method, the candidates: the settings on the Pareto front of (eager speed-up, search
   pixel agreement), and those within ``NEAR`` of it;
4. per backend, the candidates timed in interleaved rounds with the unmerged model (Inductor:
   each compiled once): per-round speed-ups, their median and p10-p90 spread;
5. the candidates scored on the check and held-out photos;
6. per backend, each method's front (chosen on the search photos and that backend's median
   speed-ups), its fidelity on every photo set interpolated linearly at each latency point
   between the front's measured settings, and the verdict of each method against ToMe: ahead
   when pixel agreement is higher by ``MARGINS``, k-means mIoU too, and mask IoU not lower; the
   verdict is also taken at the pessimistic end of the spread (the method at its p10
   speed-ups, ToMe at its p90).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpm_fx.fidelity import Judge
from mpm_fx.methods import counted, label, policy, removals

from .common import interleaved, p10_p90_ms

METRICS = ("pixel_agreement", "iou", "kmeans_miou", "mae")
MARGINS = {"pixel_agreement": 0.002, "kmeans_miou": 0.01, "iou": 0.0}  # "ahead of ToMe" by
POINTS = (1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8)  # latency points: speed-ups over unmerged
NEAR = {"pixel_agreement": 0.002, "speedup": 0.03}  # candidates near the front (stage 3)
EVERY = tuple(range(12))
# the sweep: schedules (block indices) x fractions of the image tokens each merge removes
SCHEDULES = ((2,), (0,), (0, 1), (0, 2), (0, 3), (2, 5), (0, 2, 4), (0, 2, 5), (0, 2, 6),
             (0, 2, 4, 7), (0, 1, 2, 4, 7), (0, 1, 2, 3, 4, 5), (2, 4, 6, 8, 10), EVERY)
FRACTIONS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
OWN_COUNT_SCHEDULES = ((2, 5), (5,), (2,), (0,), (0, 1), (0, 2), (0, 1, 2), (0, 2, 3), (0, 2, 4),
                       (0, 2, 4, 7), (2, 4, 6, 8, 10), (0, 1, 2, 3, 4, 5), (0, 2, 4, 6, 8, 10),
                       (1, 3, 5, 7, 9, 11), EVERY)


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a method with its own options (``variant``, (name, value)
    pairs: e.g. forest with edges="alternate") at a schedule (and its removals per merge)."""

    method: str
    schedule: tuple
    r: tuple | None = None
    variant: tuple = ()

    def options(self) -> dict:
        return {"method": self.method, **dict(self.variant),
                **({"r": self.r} if self.r is not None else {})}

    @property
    def label(self) -> str:
        """The method as ``--methods`` names it, its options included: "forest:edges=alternate";
        fronts, tables and plots group by it."""
        return label(self.method, dict(self.variant))

    @property
    def key(self) -> str:
        r = "" if self.r is None else " r=" + ",".join(map(str, self.r))
        return f"{self.label} {self.schedule}{r}"


def sweep(methods, image_tokens: int, schedules=SCHEDULES, fractions=FRACTIONS,
          own_count_schedules=OWN_COUNT_SCHEDULES) -> list:
    """Every setting of the sweep, per method (a name, or "name:option=value" as ``policy``
    reads it): schedules x fractions for the methods that remove a count, the schedules alone
    for the ones that find their own."""
    out = []
    for text in methods:
        method, options = policy(text)
        variant = tuple(options.items())
        if not counted(method):
            out += [Setting(method, s, variant=variant) for s in own_count_schedules]
            continue
        for schedule in schedules:
            for f in fractions:
                r = removals(image_tokens, len(schedule), f)
                if all(r):
                    out.append(Setting(method, schedule, r, variant))
    return list(dict.fromkeys(out))


def check_methods(methods) -> list:
    """The labels of ``--methods``, each checked with ``merging`` before anything is measured
    (an unknown option or a bad value: UsageError naming the fix), in ``Setting.label``'s
    spelling."""
    from mpm_fx.methods import merging

    from .common import UsageError

    labels = []
    for text in methods:
        try:
            method, options = policy(text)
            merging(method, r=1 if counted(method) else None, **options)
        except ValueError as e:
            raise UsageError(f"--methods {text}: {e}") from None
        labels.append(label(method, options))
    if len(set(labels)) < len(labels):
        raise UsageError(f"--methods names a method twice: {', '.join(labels)}")
    return labels


def pareto(points: list, speed, fidelity) -> list:
    """The points no other point beats on both (faster and more faithful), fastest first."""
    ordered = sorted(points, key=lambda p: (-speed(p), -fidelity(p)))
    front, best = [], float("-inf")
    for p in ordered:
        if fidelity(p) > best:
            front.append(p)
            best = fidelity(p)
    return front


def near_front(points: list, speed, fidelity) -> list:
    """The front and the points within ``NEAR`` of it: those that would be on it if they were
    ``NEAR["speedup"]`` faster (relatively) and ``NEAR["pixel_agreement"]`` more faithful (a
    point just behind the front on one backend may be on it on another)."""
    front = pareto(points, speed, fidelity)

    def near(p):
        return not any(speed(q) > speed(p) * (1 + NEAR["speedup"])
                       and fidelity(q) > fidelity(p) + NEAR["pixel_agreement"] for q in front)

    return [p for p in points if p in front or near(p)]


def at_speed(front: list, speedup: float, speed, metric) -> float | None:
    """A front's metric at ``speedup``, linearly interpolated between its two measured points
    around it; its slowest point's where every point is faster; None where none is as fast."""
    ordered = sorted(front, key=speed)
    if not ordered or speed(ordered[-1]) < speedup:
        return None
    if speed(ordered[0]) >= speedup:
        return metric(ordered[0])
    for a, b in zip(ordered, ordered[1:]):
        if speed(a) <= speedup <= speed(b):
            t = (speedup - speed(a)) / (speed(b) - speed(a)) if speed(b) > speed(a) else 0.0
            return metric(a) + t * (metric(b) - metric(a))
    return None


def verdict(ours: dict, theirs: dict) -> str:
    """"ahead" when every margin of ``MARGINS`` holds, else the metrics that miss; "n/a" when
    either front does not reach the point."""
    if any(v is None for v in (*ours.values(), *theirs.values())):
        return "n/a"
    missing = [m for m, margin in MARGINS.items() if ours[m] - theirs[m] < margin]
    return "ahead" if not missing else "not: " + ", ".join(
        f"{m} {ours[m] - theirs[m]:+.4f}" for m in missing)


def score_all(judge: Judge, settings: list, progress=None) -> dict:
    """{setting key: Judge.score of it, per-image rows dropped}."""
    out = {}
    for i, s in enumerate(settings):
        scores = judge.score(s.schedule, **s.options())
        out[s.key] = {k: v for k, v in scores.items() if k != "per_image"}
        if progress:
            progress(i + 1, len(settings))
    return out


def time_all(model, x, settings: list, backend: str, repeats: int, make_runner) -> dict:
    """{setting key: {median, p10, p90 of its per-round speed-up, median ms, compile s}}, and
    the unmerged model under "unmerged": every setting and the unmerged model once per round."""
    runners, compile_s = {}, {}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               8 * (len(settings) + 1))
    tmp = Path(tempfile.mkdtemp(prefix="mpm-frontier-"))
    with torch.inference_mode():
        for s in [None] + list(settings):
            start = time.perf_counter()
            key = "unmerged" if s is None else s.key
            runners[key] = make_runner(model, x, () if s is None else s.schedule, backend, tmp,
                                       None if s is None else s.options())
            compile_s[key] = time.perf_counter() - start
        times = interleaved({k: (lambda f=f: f(x)) for k, f in runners.items()}, repeats)
    base = times["unmerged"]
    out = {}
    for key, samples in times.items():
        ratios = [b / t for b, t in zip(base, samples)]  # speed-up in each round
        p10, p90 = p10_p90_ms(ratios)
        out[key] = {"speedup": statistics.median(ratios), "speedup_p10": p10,
                    "speedup_p90": p90, "median_ms": statistics.median(samples),
                    "compile_s": compile_s[key]}
    return out


def fronts(settings: list, search: dict, timing: dict) -> dict:
    """Per method, its Pareto front on one backend: (its timing speed-up, search pixel
    agreement), as setting keys, fastest first."""
    by_method = {}
    for s in settings:
        if s.key in timing:
            by_method.setdefault(s.label, []).append(s.key)
    return {m: pareto(keys, lambda k: timing[k]["speedup"],
                      lambda k: search[k]["pixel_agreement"])
            for m, keys in by_method.items()}


def compare_fronts(front: dict, timing: dict, scores: dict, points=POINTS,
                   against: str = "tome") -> list:
    """Rows per latency point: each method's metrics on one photo set (``scores``) at that
    speed-up along its front, and its verdict against ``against`` (at the median speed-ups,
    and with the spread against it)."""
    rows = []
    for point in points:
        row = {"speedup": point, "methods": {}}
        for method, keys in front.items():
            for end in ("speedup", "speedup_p10", "speedup_p90"):
                values = {m: at_speed(keys, point, lambda k: timing[k][end],
                                      lambda k, m=m: scores[k][m]) for m in METRICS}
                row["methods"].setdefault(method, {})[end] = values
        if against in front:
            theirs = row["methods"][against]
            for method in front:
                if method != against:
                    ours = row["methods"][method]
                    row["methods"][method]["verdict"] = verdict(
                        _margined(ours["speedup"]), _margined(theirs["speedup"]))
                    row["methods"][method]["verdict_with_spread"] = verdict(
                        _margined(ours["speedup_p10"]), _margined(theirs["speedup_p90"]))
        rows.append(row)
    return rows


def _margined(values: dict) -> dict:
    return {m: values[m] for m in MARGINS}


def main(args) -> dict:
    """``mpm-bench frontier``: the stages of the module docstring; writes frontier.json and
    frontier.png under ``args.out``."""
    from mpm_fx.bench.models.photos import photo_set, photos

    from .common import header, print_header, write_json
    from .progress import Stages
    from .run import load_model, make_runner

    methods = check_methods(args.methods)  # a bad option fails before anything is loaded
    info = header()
    print_header(info)
    quick = QUICK if args.quick else {}
    size = quick.get("size", args.size)
    sets = {name: photo_set(name)[:quick.get("photos", 99)] for name in PHOTO_SETS}
    stages = Stages(5 + len(args.backends))
    with stages(f"loading {args.model} at {size} px and the unmerged outputs of "
                f"{sum(map(len, sets.values()))} photos"):
        model = load_model(args.model, size)
        judges = {name: Judge(model, photos(names, size), classes=args.classes, names=names)
                  for name, names in sets.items()}
        x = judges["search"].images[0]
        image_tokens = mpm_fx_report(model, x).image_tokens
    given = {k: tuple(map(tuple, v)) if "schedules" in k else tuple(v)  # --schedules etc.
             for k in ("schedules", "fractions", "own_count_schedules")
             if (v := getattr(args, k, None))}
    grid = {"schedules": SCHEDULES, "fractions": FRACTIONS,
            "own_count_schedules": OWN_COUNT_SCHEDULES} | quick.get("sweep", {}) | given
    settings = sweep(methods, image_tokens, **grid)
    with stages(f"fidelity of {len(settings)} settings on the {len(sets['search'])} search "
                "photos"):
        search = score_all(judges["search"], settings)
    with stages(f"eager latency of every setting, {args.screen_repeats} rounds (the screen)"):
        screen = time_all(model, x, settings, "eager", args.screen_repeats, make_runner)
    candidates = []
    for method in methods:
        mine = [s for s in settings if s.label == method]
        candidates += near_front(mine, lambda s: screen[s.key]["speedup"],
                                 lambda s: search[s.key]["pixel_agreement"])
    timing = {}
    for backend in args.backends:
        with stages(f"{backend}: {len(candidates)} candidates and the unmerged model, "
                    f"{args.repeats} interleaved rounds"):
            timing[backend] = time_all(model, x, candidates, backend, args.repeats,
                                       make_runner)
    with stages(f"fidelity of the {len(candidates)} candidates on "
                + " and ".join(n for n in sets if n != "search")):
        scores = {"search": search} | {name: score_all(judges[name], candidates)
                                        for name in sets if name != "search"}
    result = {"header": info, "model": args.model, "size": size, "image_tokens": image_tokens,
              "methods": methods, "out": args.out.as_posix(),
              "sweep": {k: [list(x) if isinstance(x, tuple) else x for x in v]
                        for k, v in grid.items()},
              "photo_sets": {k: list(v) for k, v in sets.items()}, "points": list(args.points),
              "margins": MARGINS, "settings": {}, "timing": timing, "screen": screen,
              "fronts": {}, "comparison": {}}
    for s in settings:
        result["settings"][s.key] = {"method": s.label, "schedule": list(s.schedule),
                                     "r": None if s.r is None else list(s.r),
                                     "candidate": s in candidates,
                                     "scores": {k: v[s.key] for k, v in scores.items()
                                                if s.key in v}}
    for backend, times in timing.items():
        front = fronts(candidates, search, times)
        result["fronts"][backend] = front
        result["comparison"][backend] = {
            name: compare_fronts(front, times, scores[name], args.points)
            for name in sets}
    with stages("writing frontier.json and frontier.png"):
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "frontier.json", result)
        from .plots import frontier_png

        frontier_png(result, args.out / "frontier.png")
    print(summary(result))
    return result


PHOTO_SETS = ("search", "check", "held-out")
# --quick: every stage in minutes on a CPU (the tests run it)
QUICK = {"size": 112, "photos": 2,
         "sweep": {"schedules": ((0,), (0, 2)), "fractions": (0.2, 0.4),
                   "own_count_schedules": ((0,), (0, 2))}}


def mpm_fx_report(model, x):
    import mpm_fx

    return mpm_fx.optimize(model, (), example_inputs=x).mpm_report()


def summary(result: dict) -> str:
    """The tables a reader wants first: per backend, each method's front at every latency
    point on the check and held-out photos, and the verdicts against ToMe."""
    from tabulate import tabulate

    lines = []
    for backend, by_set in result["comparison"].items():
        for name, rows in by_set.items():
            if name == "search":
                continue
            table = []
            for row in rows:
                cells = [f"{row['speedup']:.1f}x"]
                for method, at in row["methods"].items():
                    v = at["speedup"]
                    cells.append("-" if v["pixel_agreement"] is None else
                                 f"{v['pixel_agreement']:.4f} / {v['iou']:.3f} / "
                                 f"{v['kmeans_miou']:.3f}")
                verdicts = [f"{m}: {at['verdict']}" for m, at in row["methods"].items()
                            if "verdict" in at]
                table.append(cells + ["; ".join(verdicts)])
            methods = list(rows[0]["methods"]) if rows else []
            lines.append(f"\n{backend}, {name} photos: pixel agreement / mask IoU / k-means "
                         "mIoU along each method's front, at equal measured speed-up")
            lines.append(tabulate(table, headers=["speed-up", *methods, "against tome"]))
    return "\n".join(lines)
