"""mpm-bench frontier: fronts, interpolation at a speed-up and the verdict against ToMe, held
to hand-worked examples; and the whole command in its quick form (real model, eager)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpm_fx.bench.common import UsageError
from mpm_fx.bench.frontier import (
    MARGINS,
    Setting,
    at_speed,
    check_methods,
    compare_fronts,
    fronts,
    near_front,
    pareto,
    sweep,
    verdict,
)
from mpm_fx.methods import removals

from fixtures import needs_held_out

POINTS = [  # (speed-up, pixel agreement)
    (1.0, 1.0), (1.2, 0.99), (1.1, 0.98), (1.5, 0.97), (1.4, 0.96), (1.8, 0.90), (1.5, 0.95),
    (1.45, 0.969)]


def speed(p):
    return p[0]


def fidelity(p):
    return p[1]


def test_the_front_holds_what_nothing_beats_on_both_axes():
    front = pareto(POINTS, speed, fidelity)
    assert front == [(1.8, 0.90), (1.5, 0.97), (1.2, 0.99), (1.0, 1.0)]
    for p in POINTS:
        if p not in front:
            assert any(speed(q) >= speed(p) and fidelity(q) >= fidelity(p) for q in front)
    near = near_front(POINTS, speed, fidelity)
    # just behind the front: on it if 3 % faster and 0.002 more faithful (nothing on the front
    # beats (1.5, 0.95) by both: 1.8 is less faithful); the others are not
    assert set(near) - set(front) == {(1.45, 0.969), (1.5, 0.95)}


def test_at_speed_interpolates_between_the_measured_points_around_it():
    front = pareto(POINTS, speed, fidelity)
    assert at_speed(front, 1.35, speed, fidelity) == pytest.approx(0.99 + 0.5 * (0.97 - 0.99))
    assert at_speed(front, 1.5, speed, fidelity) == pytest.approx(0.97)
    assert at_speed(front, 0.9, speed, fidelity) == 1.0  # slower than every point: the slowest
    assert at_speed(front, 1.9, speed, fidelity) is None  # no setting that fast


def test_the_verdict_needs_every_margin():
    theirs = {"pixel_agreement": 0.95, "kmeans_miou": 0.70, "iou": 0.90}
    assert verdict({k: v + m for (k, v), m in zip(theirs.items(), MARGINS.values())},
                   theirs) == "ahead"
    short = {**theirs, "pixel_agreement": 0.951, "kmeans_miou": 0.75}
    assert verdict(short, theirs) == "not: pixel_agreement +0.0010"
    assert verdict({**theirs, "iou": None}, theirs) == "n/a"


def test_fronts_are_compared_at_equal_speed_ups_with_the_spread():
    timing = {k: {"speedup": s, "speedup_p10": s - 0.05, "speedup_p90": s + 0.05}
              for k, s in (("a", 1.3), ("b", 1.6), ("c", 1.25), ("d", 1.7))}
    scores = {"a": 0.99, "b": 0.97, "c": 0.98, "d": 0.95}
    metrics = {k: {"pixel_agreement": v, "iou": v, "kmeans_miou": v, "mae": 1 - v}
               for k, v in scores.items()}
    rows = compare_fronts({"forest": ["a", "b"], "tome": ["c", "d"]}, timing, metrics, [1.5])
    forest, tome = rows[0]["methods"]["forest"], rows[0]["methods"]["tome"]
    assert forest["speedup"]["pixel_agreement"] == pytest.approx(0.99 + 2 / 3 * (0.97 - 0.99))
    assert tome["speedup"]["pixel_agreement"] == pytest.approx(0.98 + 0.25 / 0.45 * (0.95 - 0.98))
    assert forest["verdict"] == "ahead"  # +0.0144 pixel agreement and k-means, IoU not lower
    # forest at its p10 speed-ups (0.9733) against ToMe at its p90 (0.9667): +0.0067, ahead by
    # pixel agreement (>= 0.002) but not by k-means mIoU (< 0.01): the spread decides it
    assert forest["speedup_p10"]["pixel_agreement"] == pytest.approx(0.99 - 0.25 / 0.3 * 0.02)
    assert forest["verdict_with_spread"] == "not: kmeans_miou +0.0067"


def test_the_sweep_covers_every_method_and_removes_at_most_half():
    settings = sweep(("mpm", "tome", "forest"), 1024)
    assert {s.method for s in settings} == {"mpm", "tome", "forest"}
    assert all(s.r is None for s in settings if s.method == "mpm")
    for s in settings:
        n = 1024
        for r in s.r or ():
            assert 0 < r <= n // 2
            n -= r
    assert Setting("tome", (0, 2), (307, 215)).key == "tome (0, 2) r=307,215"


def test_a_method_with_options_is_its_own_front():
    settings = sweep(("forest", "forest:edges=alternate"), 1024, schedules=((0, 2),),
                     fractions=(0.3,))
    plain, alternate = settings
    assert (plain.method, alternate.method) == ("forest", "forest")
    assert alternate.label == "forest:edges=alternate" and plain.label == "forest"
    assert alternate.key == "forest:edges=alternate (0, 2) r=307,215" != plain.key
    assert alternate.options() == {"method": "forest", "edges": "alternate", "r": (307, 215)}
    timing = {s.key: {"speedup": 1.5} for s in settings}
    search = {s.key: {"pixel_agreement": 0.9} for s in settings}
    assert fronts(settings, search, timing) == {"forest": [plain.key],
                                                "forest:edges=alternate": [alternate.key]}
    assert check_methods(["tome", " forest:edges=alternate"]) == ["tome",
                                                                  "forest:edges=alternate"]


@pytest.mark.parametrize("methods, message", [
    (["forest:edges=odd"], r"--methods forest:edges=odd: option edges of 'forest' must be one"),
    (["tome:beta=1"], r"unknown option\(s\) beta for method 'tome'"),
    (["forest:edges=alternate", "forest: edges=alternate"], r"names a method twice"),
])
def test_bad_methods_fail_before_anything_is_measured(methods, message):
    with pytest.raises(UsageError, match=message):
        check_methods(methods)


@pytest.mark.compile
@needs_held_out
def test_the_quick_frontier_runs_end_to_end(tmp_path):
    """The real model at 112 px, two photos per set, eager: every stage, a front per method,
    the comparison rows on every photo set; a sweep flag replaces that part of the sweep; a
    method with an option is its own front, and its option reaches the op (its fidelity is not
    plain forest's at the same counts)."""
    script = Path(sys.executable).parent / "mpm-bench"
    done = subprocess.run([str(script), "frontier", "--quick", "--backends", "eager",
                           "--methods", "mpm,tome,forest,forest:edges=alternate",
                           "--repeats", "2", "--screen-repeats", "2", "--fractions", "0.25",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "frontier.json").read_text())
    assert set(result["fronts"]["eager"]) == {"mpm", "tome", "forest", "forest:edges=alternate"}
    assert set(result["comparison"]["eager"]) == {"search", "check", "held-out"}
    for keys in result["fronts"]["eager"].values():
        for k in keys:  # every front setting was timed and scored on every set
            assert set(result["settings"][k]["scores"]) == {"search", "check", "held-out"}
            assert k in result["timing"]["eager"]
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert result["sweep"]["fractions"] == [0.25]
    settings = result["settings"]
    alternate = [k for k, s in settings.items() if s["method"] == "forest:edges=alternate"]
    assert len(alternate) == 2  # (0,) and (0, 2) at 0.25
    for key in alternate:
        plain = settings[key.replace("forest:edges=alternate", "forest")]
        assert settings[key]["scores"]["search"] != plain["scores"]["search"]
    assert result["sweep"]["schedules"] == [[0], [0, 2]]  # --quick's, not replaced
    for s in result["settings"].values():
        assert s["r"] is None or tuple(s["r"]) == removals(result["image_tokens"],
                                                          len(s["schedule"]), 0.25)
