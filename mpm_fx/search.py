"""Schedule search: ``mpm_fx.tune`` picks the merge schedule for a model and a budget, by
measuring (beyond the paper, which hand-picks (2, 5)).

    result = mpm_fx.tune(model, calibration_images, budget={"min_fidelity": 0.97})
    result.schedule   # the fastest schedule whose mean pixel agreement stays >= 0.97
    print(result)     # every schedule measured: fidelity, latency, speed-up, token counts

Budgets (exactly one): ``{"min_fidelity": f}`` (the fastest schedule whose mean ``metric`` over
the calibration images stays >= f), ``{"max_latency_ms": t}`` or ``{"min_speedup": s}`` (the
most faithful schedule that is at least that fast). "Fastest" compares speed-ups, each measured
interleaved with the unmerged model in the same rounds, not absolute times, which drift between
candidates measured minutes apart.

The search is greedy forward selection over encoder blocks: start from no merge, try adding each
remaining block, keep the best addition (the fastest one that meets the fidelity budget, or the
most faithful one), and repeat while it helps. It costs about ``blocks x steps`` candidate
evaluations, each a capture (an export), one run per calibration image and ``repeats`` timed
runs interleaved with the unmerged model (speed-ups are ratios measured in the same rounds).
Latency is eager, batch 1, on the first calibration image.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from mpm_fx.errors import MPMError
from mpm_fx.fidelity import compare
from mpm_fx.optimize import optimize

__all__ = ["tune", "TuneResult", "Candidate"]

_METRICS = ("pixel_agreement", "iou", "mae")


@dataclass(frozen=True)
class Candidate:
    schedule: tuple
    fidelity: dict  # mean over calibration images of mpm_fx.fidelity.compare
    latency_ms: float  # median, batch 1, eager
    speedup: float  # unmerged / merged, medians of the same interleaved rounds
    token_counts: tuple  # mean image tokens after each merge


@dataclass(frozen=True)
class TuneResult:
    schedule: tuple | None  # None: no schedule meets the budget
    best: Candidate | None
    budget: dict
    metric: str
    baseline_ms: float
    table: tuple  # every Candidate measured, in search order

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = [[str(c.schedule), f"{c.fidelity[self.metric]:.4f}", f"{c.latency_ms:.1f}",
                 f"{c.speedup:.2f}x", " -> ".join(f"{n:.0f}" for n in c.token_counts),
                 "<- chosen" if c is self.best else ""] for c in self.table]
        head = (f"budget {self.budget}, metric {self.metric}, unmerged {self.baseline_ms:.1f} ms: "
                f"{'schedule ' + str(self.schedule) if self.best else 'no schedule meets it'}")
        return head + "\n" + tabulate(rows, headers=["schedule", self.metric, "ms", "speed-up",
                                                     "image tokens", ""])


def tune(model: nn.Module, calibration_images, budget: dict, *, metric: str = "pixel_agreement",
         blocks=None, max_merges: int | None = None, repeats: int = 5,
         size_aware: bool = False) -> TuneResult:
    """Search a merge schedule for ``model`` under ``budget`` (see the module docstring).

    calibration_images:  (B, C, H, W) tensor, or a sequence of (1, C, H, W) tensors.
    metric:              which fidelity the budget and the ranking use: "pixel_agreement"
                         (default), "iou" (higher is better) or "mae" (lower is better).
    blocks:              encoder blocks the search may merge before (default: all).
    max_merges:          stop after this many merges.
    """
    kind, target = _check_budget(budget)
    if metric not in _METRICS:
        raise MPMError(f"metric must be one of {_METRICS}, got {metric!r}")
    images = _images(calibration_images)
    with torch.inference_mode():
        reference = [model(x) for x in images]
        depth = len(optimize(model, (), example_inputs=images[0]).mpm_report().blocks)
    allowed = sorted(set(range(depth) if blocks is None else blocks))
    if not allowed or not all(0 <= k < depth for k in allowed):
        raise MPMError(f"blocks must be indices of the {depth} encoder blocks, got {blocks!r}")

    better = (lambda a, b: a < b) if metric == "mae" else (lambda a, b: a > b)
    table, baseline = [], []

    def measure(schedule: tuple) -> Candidate:
        optimized = optimize(model, schedule, size_aware=size_aware)
        with torch.inference_mode():
            scores, counts = [], []
            for x, ref in zip(images, reference):
                scores.append(compare(ref, optimized(x)))
                counts.append(optimized.mpm_report().token_counts)
            base_ms, merged_ms = _interleaved(model, optimized, images[0], repeats)
        baseline.extend(base_ms)
        mean = {k: statistics.mean(s[k] for s in scores) for k in scores[0]}
        tokens = tuple(statistics.mean(c[i][0] for c in counts) for i in range(len(schedule)))
        candidate = Candidate(schedule, mean, statistics.median(merged_ms),
                              statistics.median(base_ms) / statistics.median(merged_ms), tokens)
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
    return TuneResult(chosen.schedule if chosen else None, chosen, dict(budget), metric,
                      statistics.median(baseline) if baseline else float("nan"), tuple(table))


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
    for _ in range(2):  # warm-up, capture included
        model(x), optimized(x)
    base, merged = [], []
    for _ in range(repeats):
        for fn, out in ((model, base), (optimized, merged)):
            start = time.perf_counter()
            fn(x)
            out.append((time.perf_counter() - start) * 1e3)
    return base, merged
