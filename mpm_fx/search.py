"""Schedule search: ``mpm_fx.tune`` picks the merge schedule for a model and a budget, by
measuring (beyond the paper, which hand-picks (2, 5)).

    result = mpm_fx.tune(model, calibration_images, budget={"min_fidelity": 0.97})
    result.schedule   # the fastest schedule whose mean pixel agreement stays >= 0.97
    print(result)     # every schedule measured: fidelity, latency, speed-up, token counts

Budgets (exactly one): ``{"min_fidelity": f}`` (the fastest schedule whose mean ``metric`` over
the calibration images stays >= f), ``{"max_latency_ms": t}`` or ``{"min_speedup": s}`` (the
most faithful schedule that is at least that fast). "Fastest" compares speed-ups (predicted by
the cost model, or measured interleaved with the unmerged model in the same rounds), never
absolute times, which drift between candidates measured minutes apart.

The search is greedy forward selection over encoder blocks: start from no merge, try adding each
remaining block, keep the best addition (the fastest one that meets the fidelity budget, or the
most faithful one), and repeat while it helps. It costs about ``blocks x steps`` candidate
evaluations, each a capture (an export) and one run per calibration image.

How fast a candidate is (``rank``):
- ``"cost_model"`` (default): predicted from its token counts by ``mpm_fx.costs`` (one encoder
  block and one merge timed once at several token counts, interleaved, plus the unmerged
  latency). The prediction is smooth in the counts, so close candidates rank by their tokens,
  not by timing noise, and the search times nothing per candidate. The chosen schedule is then
  timed for real, interleaved with the unmerged model (``TuneResult.measured``).
  The cost model times plain blocks: with ``size_aware=True`` the predictions leave out the
  extra key channel (a few per cent eager, nothing measurable under Inductor).
- ``"measured"``: every candidate timed, ``repeats`` rounds interleaved with the unmerged model.
Latency is eager, batch 1: the mean over the calibration images (cost model), or the first
calibration image (measured).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from mpm_fx import costs as cost_model
from mpm_fx.errors import MPMError
from mpm_fx.fidelity import compare
from mpm_fx.optimize import optimize

__all__ = ["tune", "TuneResult", "Candidate"]

_METRICS = ("pixel_agreement", "iou", "mae")


@dataclass(frozen=True)
class Candidate:
    schedule: tuple
    fidelity: dict  # mean over calibration images of mpm_fx.fidelity.compare
    latency_ms: float  # batch 1, eager: predicted (rank="cost_model") or median measured
    speedup: float  # unmerged / merged: predicted, or medians of the same interleaved rounds
    token_counts: tuple  # mean image tokens after each merge


@dataclass(frozen=True)
class TuneResult:
    schedule: tuple | None  # None: no schedule meets the budget
    best: Candidate | None
    budget: dict
    metric: str
    baseline_ms: float
    table: tuple  # every Candidate measured, in search order
    rank: str = "cost_model"
    measured: dict | None = None  # rank="cost_model": the chosen schedule timed for real
    costs: cost_model.CostModel | None = None

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = [[str(c.schedule), f"{c.fidelity[self.metric]:.4f}", f"{c.latency_ms:.1f}",
                 f"{c.speedup:.2f}x", " -> ".join(f"{n:.0f}" for n in c.token_counts),
                 "<- chosen" if c is self.best else ""] for c in self.table]
        how = "predicted by the cost model" if self.rank == "cost_model" else "measured"
        head = (f"budget {self.budget}, metric {self.metric}, unmerged {self.baseline_ms:.1f} ms, "
                f"latency {how}: "
                f"{'schedule ' + str(self.schedule) if self.best else 'no schedule meets it'}")
        if self.measured:
            head += (f"; measured {self.measured['merged_ms']:.1f} vs "
                     f"{self.measured['unmerged_ms']:.1f} ms, {self.measured['speedup']:.2f}x")
        return head + "\n" + tabulate(rows, headers=["schedule", self.metric, "ms", "speed-up",
                                                     "image tokens", ""])


def tune(model: nn.Module, calibration_images, budget: dict, *, metric: str = "pixel_agreement",
         blocks=None, max_merges: int | None = None, repeats: int = 5,
         size_aware: bool = False, rank: str = "cost_model") -> TuneResult:
    """Search a merge schedule for ``model`` under ``budget`` (see the module docstring).

    calibration_images:  (B, C, H, W) tensor, or a sequence of (1, C, H, W) tensors.
    metric:              which fidelity the budget and the ranking use: "pixel_agreement"
                         (default), "iou" (higher is better) or "mae" (lower is better).
    blocks:              encoder blocks the search may merge before (default: all).
    max_merges:          stop after this many merges.
    repeats:             timing rounds (of the cost model, or of every candidate).
    rank:                "cost_model" (default) or "measured" (see the module docstring).
    """
    kind, target = _check_budget(budget)
    if metric not in _METRICS:
        raise MPMError(f"metric must be one of {_METRICS}, got {metric!r}")
    if rank not in ("cost_model", "measured"):
        raise MPMError(f"rank must be 'cost_model' or 'measured', got {rank!r}")
    images = _images(calibration_images)
    with torch.inference_mode():
        reference = [model(x) for x in images]
        report = optimize(model, (), example_inputs=images[0]).mpm_report()
    depth = len(report.blocks)
    allowed = sorted(set(range(depth) if blocks is None else blocks))
    if not allowed or not all(0 <= k < depth for k in allowed):
        raise MPMError(f"blocks must be indices of the {depth} encoder blocks, got {blocks!r}")

    better = (lambda a, b: a < b) if metric == "mae" else (lambda a, b: a > b)
    table, baseline = [], []
    costs = (cost_model.measure(model, images[0], repeats=repeats, report=report)
             if rank == "cost_model" else None)

    def measure(schedule: tuple) -> Candidate:
        optimized = optimize(model, schedule, size_aware=size_aware)
        with torch.inference_mode():
            scores, counts = [], []
            for x, ref in zip(images, reference):
                scores.append(compare(ref, optimized(x)))
                counts.append([c[0] for c in optimized.mpm_report().token_counts])
        mean = {k: statistics.mean(s[k] for s in scores) for k in scores[0]}
        tokens = tuple(statistics.mean(c[i] for c in counts) for i in range(len(schedule)))
        if costs is not None:
            latency = statistics.mean(costs.merged_ms(schedule, c) for c in counts)
            candidate = Candidate(schedule, mean, latency, costs.unmerged_ms / latency, tokens)
        else:
            with torch.inference_mode():
                base_ms, merged_ms = _interleaved(model, optimized, images[0], repeats)
            baseline.extend(base_ms)
            candidate = Candidate(schedule, mean, statistics.median(merged_ms),
                                  statistics.median(base_ms) / statistics.median(merged_ms),
                                  tokens)
        table.append(candidate)
        return candidate

    def meets_latency(c: Candidate) -> bool:
        return (c.latency_ms <= target) if kind == "max_latency_ms" else (c.speedup >= target)

    chosen, current = None, ()
    while len(current) < min(max_merges or depth, len(allowed)):
        step = [measure(tuple(sorted(current + (k,)))) for k in allowed if k not in current]
        if kind == "min_fidelity":
            ok = [c for c in step if not better(target, c.fidelity[metric])]  # >= (or <= mae)
            if not ok:
                break
            pick = max(ok, key=lambda c: c.speedup)  # a ratio from one set of rounds: drift-free
            chosen = pick if chosen is None or pick.speedup > chosen.speedup else chosen
        else:
            fast = [c for c in step if meets_latency(c)]
            if fast:
                chosen = max(fast, key=lambda c: _rank(c, metric))
                break
            pick = max(step, key=lambda c: _rank(c, metric))
        current = pick.schedule
    measured = None
    if costs is not None and chosen is not None:
        with torch.inference_mode():
            base_ms, merged_ms = _interleaved(model, optimize(model, chosen.schedule,
                                                              size_aware=size_aware),
                                              images[0], repeats)
        measured = {"unmerged_ms": statistics.median(base_ms),
                    "merged_ms": statistics.median(merged_ms),
                    "speedup": statistics.median(base_ms) / statistics.median(merged_ms)}
    if costs is not None:
        baseline_ms = costs.unmerged_ms
    else:
        baseline_ms = statistics.median(baseline) if baseline else float("nan")
    return TuneResult(chosen.schedule if chosen else None, chosen, dict(budget), metric,
                      baseline_ms, tuple(table), rank, measured, costs)


def _rank(c: Candidate, metric: str) -> float:
    value = c.fidelity[metric]
    return -value if metric == "mae" else value


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


def _interleaved(model, optimized, x, repeats: int) -> tuple:
    times = cost_model.interleaved({"base": lambda: model(x), "merged": lambda: optimized(x)},
                                   repeats)
    return times["base"], times["merged"]
