"""Setting search: ``mpm_fx.tune`` picks the merge method, schedule and token counts for a model
and a budget, by measuring (beyond the paper, which hand-picks (2, 5)).

    result = mpm_fx.tune(model, calibration_images, budget={"min_fidelity": 0.97})
    result.best       # the fastest setting whose mean pixel agreement stays >= 0.97
    result.setting()  # its optimize arguments: mpm_fx.optimize(model, **result.setting())
    result.front      # the Pareto front of speed against fidelity over every setting tried
    print(result)     # every setting measured: method, schedule, fidelity, speed-up, tokens

Budgets (exactly one): ``{"min_fidelity": f}`` (the fastest setting whose mean ``metric`` over
the calibration images stays >= f), ``{"max_latency_ms": t}`` or ``{"min_speedup": s}`` (the
most faithful setting that is at least that fast). "Fastest" compares speed-ups, never
absolute times, which drift between candidates measured minutes apart.

The search: for every merge method of ``methods`` and, for the methods that merge a fixed
count, every removal fraction of ``fractions`` (each merge removes that fraction of the image
tokens it receives, r = floor(f N), at most N // 2), a greedy forward selection over encoder
blocks: start from no merge, try adding each remaining block, keep the best addition (the
fastest one that meets the fidelity budget, or the most faithful one), and repeat while it
helps. Each candidate costs a capture (an export) and one run per calibration image.

How fast a candidate is (``rank``):
- ``"cost_model"`` (default): predicted from its token counts by ``mpm_fx.costs`` (one encoder
  block and one merge timed at several token counts, interleaved, plus the unmerged latency),
  measured once per machine and model shape and cached (``costs.measure_cached``;
  ``recalibrate=True`` measures again). So two searches on the same photos rank alike and
  return the same setting: no timing noise reorders close candidates. The chosen setting is
  then timed for real, interleaved with the unmerged model (``TuneResult.measured``). The cost
  model times plain blocks and MPM's merge (size-aware attention's extra key channel and the
  other methods' merges are left out: a few per cent of a block).
- ``"measured"``: every candidate timed, ``repeats`` rounds interleaved with the unmerged model
  (noisy: two searches may differ).
Latency is eager, batch 1: the mean over the calibration images (cost model), or the first
calibration image (measured).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from mpm_fx import costs as cost_model
from mpm_fx.errors import MPMError
from mpm_fx.fidelity import Judge, score_images
from mpm_fx.methods import METHODS, counted, merging, removals
from mpm_fx.optimized import optimize
from mpm_fx.passes.capture import captures_shared

__all__ = ["tune", "TuneResult", "Candidate", "FRACTIONS"]

_METRICS = ("pixel_agreement", "iou", "mae")
FRACTIONS = (0.1, 0.2, 0.3)  # default removal fractions of the methods with a fixed count


@dataclass(frozen=True)
class Candidate:
    schedule: tuple
    fidelity: dict  # mean over calibration images of mpm_fx.fidelity.compare
    latency_ms: float  # batch 1, eager: predicted (rank="cost_model") or median measured
    speedup: float  # unmerged / merged: predicted, or medians of the same interleaved rounds
    token_counts: tuple  # mean image tokens after each merge
    method: str = "mpm"
    method_options: dict = field(default_factory=dict)  # e.g. r, for the counted methods

    def setting(self) -> dict:
        """``mpm_fx.optimize`` keyword arguments of this candidate."""
        return {"schedule": self.schedule, "method": self.method, **self.method_options}

    @property
    def label(self) -> str:
        r = self.method_options.get("r")
        return self.method if r is None else f"{self.method} r={list(r)}"


@dataclass(frozen=True)
class TuneResult:
    schedule: tuple | None  # None: no setting meets the budget
    best: Candidate | None
    budget: dict
    metric: str
    baseline_ms: float
    table: tuple  # every Candidate measured, in search order
    rank: str = "cost_model"
    measured: dict | None = None  # rank="cost_model": the chosen setting timed for real
    costs: cost_model.CostModel | None = None
    front: tuple = ()  # the Pareto front (speed-up against fidelity), fastest first
    # check_images given: the chosen setting's fidelity on them (Judge.score: pixel agreement,
    # mask IoU, MAE, k-means mIoU, tokens), images the search never saw
    checked: dict | None = None

    def setting(self) -> dict:
        """The chosen setting as ``mpm_fx.optimize`` keyword arguments ({} if none)."""
        return self.best.setting() if self.best else {}

    def __str__(self) -> str:
        rows = [[c.method, str(c.schedule), f"{c.fidelity[self.metric]:.4f}",
                 f"{c.latency_ms:.1f}", f"{c.speedup:.2f}x",
                 " -> ".join(f"{n:.0f}" for n in c.token_counts),
                 "<- chosen" if c is self.best else ("front" if c in self.front else "")]
                for c in self.table]
        how = "predicted by the cost model" if self.rank == "cost_model" else "measured"
        chosen = (f"{self.best.method} at {self.schedule}" if self.best
                  else "no setting meets it")
        head = (f"budget {self.budget}, metric {self.metric}, unmerged {self.baseline_ms:.1f} ms, "
                f"latency {how}: {chosen}")
        if self.measured:
            head += (f"; measured {self.measured['merged_ms']:.1f} vs "
                     f"{self.measured['unmerged_ms']:.1f} ms, {self.measured['speedup']:.2f}x")
        if self.checked:
            head += (f"; on {len(self.checked['per_image'])} images the search never saw: "
                     f"{self.metric} {self.checked[self.metric]:.4f}")
        return head + "\n" + _table(rows, ["method", "schedule", self.metric, "ms", "speed-up",
                                             "image tokens", ""])


def tune(model: nn.Module, calibration_images, budget: dict, *, metric: str = "pixel_agreement",
         methods=METHODS, fractions=FRACTIONS, blocks=None, max_merges: int | None = None,
         repeats: int = 5, size_aware=None, rank: str = "cost_model",
         recalibrate: bool = False, check_images=None) -> TuneResult:
    """Search a merge method, schedule and count for ``model`` under ``budget`` (see the module
    docstring).

    calibration_images:  (B, C, H, W) tensor, or a sequence of (1, C, H, W) tensors.
    metric:              which fidelity the budget and the ranking use: "pixel_agreement"
                         (default), "iou" (higher is better) or "mae" (lower is better).
    methods:             merge methods to search (names of ``mpm_fx.METHODS``, default all).
    fractions:           removal fractions per merge tried for the methods with a fixed count.
    blocks:              encoder blocks the search may merge at (default: all).
    max_merges:          stop after this many merges.
    repeats:             timing rounds (of the cost model, or of every candidate).
    size_aware:          proportional attention (None: each method's default).
    rank:                "cost_model" (default) or "measured" (see the module docstring).
    recalibrate:         measure the cost model again instead of reading it from the cache.
    check_images:        images the search does not see: the chosen setting is scored on them
                         (``TuneResult.checked``), to say whether its fidelity holds beyond the
                         calibration images it was chosen on.
    """
    goal = _Goal(*_check_budget(budget), metric=_check_metric(metric))
    methods = _check_methods(methods, fractions)
    with captures_shared():  # the model is traced once; each candidate rewrites a copy
        study = _Study(model, _images(calibration_images), size_aware)
        speed = _SPEEDS[_check_rank(rank)](study, repeats, recalibrate)
        allowed = study.blocks(blocks)
        table = []

        def candidates(method: str, fraction):
            def candidate(schedule: tuple) -> Candidate:
                options = ({} if fraction is None else
                           {"r": removals(study.report.image_tokens, len(schedule), fraction)})
                fidelity, tokens = study.fidelity(schedule, method, options)
                placement = merging(method, **options).placement
                latency, speedup = speed.of(schedule, study.counts, placement, method, options)
                table.append(Candidate(schedule, fidelity, latency, speedup, tokens, method,
                                       options))
                return table[-1]
            return candidate

        best = None
        for method in methods:
            for fraction in (fractions if counted(method) else (None,)):
                found = greedy(allowed, min(max_merges or len(allowed), len(allowed)),
                               candidates(method, fraction), goal)
                best = goal.better(found, best)
        checked = None
        if best is not None and check_images is not None:
            judge = Judge(model, _images(check_images))
            checked = judge.score(best.schedule, method=best.method, size_aware=size_aware,
                                  **best.method_options)
        return TuneResult(best.schedule if best else None, best, dict(budget), metric,
                          speed.baseline_ms(), tuple(table), rank, speed.confirm(best),
                          speed.costs, goal.front(table), checked)


def greedy(blocks: list, limit: int, candidate, goal) -> Candidate | None:
    """Greedy forward selection: from no merge, try adding each remaining block, let ``goal``
    keep the best addition, and repeat while it helps (at most ``limit`` merges)."""
    chosen, current = None, ()
    while len(current) < limit:
        step = [candidate(tuple(sorted(current + (k,)))) for k in blocks if k not in current]
        chosen, current = goal.step(step, chosen)
        if current is None:
            break
    return chosen


@dataclass(frozen=True)
class _Goal:
    """The budget: what one greedy step keeps and whether the search goes on."""

    kind: str
    target: float
    metric: str

    def step(self, step: list, chosen):
        """(the best schedule so far, the schedule to extend next or None to stop)."""
        if self.kind == "min_fidelity":
            ok = [c for c in step if self._faithful(c)]
            if not ok:
                return chosen, None
            # a ratio from one set of rounds: drift-free; equal speed-ups (the cost model gives
            # one to every setting that leaves the same counts) go to the more faithful
            pick = max(ok, key=self._fastest)
            return self.better(pick, chosen), pick.schedule
        fast = [c for c in step if self._fast(c)]
        if fast:
            return max(fast, key=self._faithfullest), None
        return chosen, max(step, key=self._faithfullest).schedule

    def better(self, a, b):
        """The better of two chosen candidates (either may be None) under the budget."""
        if a is None or b is None:
            return a or b
        key = self._fastest if self.kind == "min_fidelity" else self._faithfullest
        return a if key(a) > key(b) else b

    def front(self, table) -> tuple:
        """The candidates no other beats on both speed-up and fidelity, fastest first."""
        front, best = [], None
        for c in sorted(table, key=self._fastest, reverse=True):
            if best is None or self._rank(c) > best:
                front.append(c)
                best = self._rank(c)
        return tuple(front)

    def _faithful(self, c: Candidate) -> bool:  # >= target (or <= for mae)
        value = c.fidelity[self.metric]
        return value <= self.target if self.metric == "mae" else value >= self.target

    def _fast(self, c: Candidate) -> bool:
        if self.kind == "max_latency_ms":
            return c.latency_ms <= self.target
        return c.speedup >= self.target

    def _fastest(self, c: Candidate) -> tuple:  # speed-up first, fidelity breaks a tie
        return c.speedup, self._rank(c)

    def _faithfullest(self, c: Candidate) -> tuple:  # fidelity first, speed-up breaks a tie
        return self._rank(c), c.speedup

    def _rank(self, c: Candidate) -> float:
        value = c.fidelity[self.metric]
        return -value if self.metric == "mae" else value


class _Study:
    """The model, its calibration images and their unmerged outputs: the fidelity and token
    counts of any schedule, each calibration image scored alone and then averaged."""

    def __init__(self, model: nn.Module, images: list, size_aware):
        self.model, self.images, self.size_aware = model, images, size_aware
        with torch.inference_mode():
            self.reference = [model(x) for x in images]
            self.report = optimize(model, (), example_inputs=images[0]).mpm_report()
        self.counts: list = []  # per image, the token counts of the last schedule scored
        self._last = None  # (schedule, its optimized model): timed without a second capture

    def blocks(self, blocks) -> list:
        depth = len(self.report.blocks)
        allowed = sorted(set(range(depth) if blocks is None else blocks))
        if not allowed or not all(0 <= k < depth for k in allowed):
            raise MPMError(f"blocks must be indices of the {depth} encoder blocks, got "
                           f"{blocks!r}")
        return allowed

    def fidelity(self, schedule: tuple, method: str = "mpm", options=None) -> tuple:
        """(mean of ``compare`` over the images, mean image tokens after each merge)."""
        optimized = optimize(self.model, schedule, method=method, size_aware=self.size_aware,
                             **(options or {}))
        self._last = ((schedule, method, tuple(sorted((options or {}).items()))), optimized)
        scores = score_images(self.reference, optimized, self.images)
        self.counts = [s.pop("tokens") for s in scores]
        mean = {k: statistics.mean(s[k] for s in scores) for k in scores[0]}
        tokens = tuple(statistics.mean(c[i] for c in self.counts) for i in range(len(schedule)))
        return mean, tokens

    def timed(self, schedule: tuple, repeats: int, method: str = "mpm", options=None) -> tuple:
        """(unmerged, merged) ms of the first image, interleaved rounds."""
        key = (schedule, method, tuple(sorted((options or {}).items())))
        optimized = (self._last[1] if self._last and self._last[0] == key else
                     optimize(self.model, schedule, method=method, size_aware=self.size_aware,
                              **(options or {})))
        x = self.images[0]
        with torch.inference_mode():
            times = cost_model.interleaved({"base": lambda: self.model(x),
                                            "merged": lambda: optimized(x)}, repeats)
        return times["base"], times["merged"]


class _PredictedSpeed:
    """rank="cost_model": latency predicted from each candidate's token counts; the chosen
    schedule is then timed for real."""

    def __init__(self, study: _Study, repeats: int, recalibrate: bool = False):
        self.study, self.repeats = study, repeats
        self.costs = cost_model.measure_cached(study.model, study.images[0], repeats=repeats,
                                               report=study.report, recalibrate=recalibrate)

    def of(self, schedule: tuple, counts: list, placement: str = "before_block", *_) -> tuple:
        latency = statistics.mean(self.costs.merged_ms(schedule, c, placement) for c in counts)
        return latency, self.costs.unmerged_ms / latency

    def baseline_ms(self) -> float:
        return self.costs.unmerged_ms

    def confirm(self, chosen) -> dict | None:
        if chosen is None:
            return None
        base, merged = self.study.timed(chosen.schedule, self.repeats, chosen.method,
                                        chosen.method_options)
        return {"unmerged_ms": statistics.median(base), "merged_ms": statistics.median(merged),
                "speedup": statistics.median(base) / statistics.median(merged)}


class _MeasuredSpeed:
    """rank="measured": every candidate timed, interleaved with the unmerged model."""

    costs = None

    def __init__(self, study: _Study, repeats: int, recalibrate: bool = False):
        self.study, self.repeats, self.baseline = study, repeats, []

    def of(self, schedule: tuple, counts: list, placement=None, method="mpm",
           options=None) -> tuple:
        base, merged = self.study.timed(schedule, self.repeats, method, options)
        self.baseline.extend(base)
        return statistics.median(merged), statistics.median(base) / statistics.median(merged)

    def baseline_ms(self) -> float:
        return statistics.median(self.baseline) if self.baseline else float("nan")

    def confirm(self, chosen) -> None:
        return None


_SPEEDS = {"cost_model": _PredictedSpeed, "measured": _MeasuredSpeed}


def _table(rows: list, headers: list) -> str:
    """A plain text table, columns padded to their widest cell."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _check_metric(metric: str) -> str:
    if metric not in _METRICS:
        raise MPMError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric


def _check_methods(methods, fractions) -> tuple:
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise MPMError(f"methods must be names of {METHODS}, got {methods!r}")
    fractions = tuple(fractions)
    if not fractions or not all(isinstance(f, (int, float)) and 0 < f <= 0.5 for f in fractions):
        raise MPMError(f"fractions must be numbers in (0, 0.5] (tokens removed per merge), got "
                       f"{fractions!r}")
    return names


def _check_rank(rank: str) -> str:
    if rank not in _SPEEDS:
        raise MPMError(f"rank must be 'cost_model' or 'measured', got {rank!r}")
    return rank


def _check_budget(budget) -> tuple:
    keys = ("min_fidelity", "max_latency_ms", "min_speedup")
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in keys:
        raise MPMError(f"budget must be a dict with exactly one of {keys}, e.g. "
                       f"{{'min_fidelity': 0.97}}; got {budget!r}")
    kind, target = next(iter(budget.items()))
    if not isinstance(target, (int, float)) or target <= 0:
        raise MPMError(f"budget {kind} must be a positive number, got {target!r}")
    return kind, float(target)


def _images(calibration_images) -> list:
    if isinstance(calibration_images, torch.Tensor):
        if calibration_images.dim() != 4 or len(calibration_images) == 0:
            raise MPMError("calibration_images must be a non-empty (B, C, H, W) tensor or a "
                           f"list of (1, C, H, W) tensors; got shape "
                           f"{tuple(calibration_images.shape)}")
        return [calibration_images[i:i + 1] for i in range(len(calibration_images))]
    images = list(calibration_images)
    if not images or not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in images):
        raise MPMError("calibration_images must be a non-empty (B, C, H, W) tensor or a list of "
                       "(1, C, H, W) tensors")
    return images
