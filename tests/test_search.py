"""mpm_fx.tune: the schedule it returns meets its budget, and its table is what it measured."""

import statistics

import pytest
import torch

import mpm_fx
from mpm_fx.fidelity import compare
from mpm_fx.models import segmenter
from mpm_fx.models.photos import photos


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="linear", n_cls=4, image_size=96,
                                n_layers=4).eval()
    return model, photos(("astronaut", "coffee", "chelsea"), 96)


def test_fastest_schedule_within_a_fidelity_budget(setup):
    model, x = setup
    result = mpm_fx.tune(model, x, {"min_fidelity": 0.9}, repeats=3)
    assert result.best is not None and result.best.fidelity["pixel_agreement"] >= 0.9
    feasible = [c for c in result.table if c.fidelity["pixel_agreement"] >= 0.9]
    assert result.best.speedup == max(c.speedup for c in feasible)
    # the table holds what an independent run gives
    optimized = mpm_fx.optimize(model, result.schedule)
    with torch.no_grad():
        agreement = statistics.mean(compare(model(x[i:i + 1]), optimized(x[i:i + 1]))
                                    ["pixel_agreement"] for i in range(len(x)))
    assert agreement == pytest.approx(result.best.fidelity["pixel_agreement"], abs=1e-12)
    assert "chosen" in str(result)


def test_most_faithful_schedule_within_a_latency_budget(setup):
    model, x = setup
    result = mpm_fx.tune(model, x, {"max_latency_ms": 1e9}, metric="mae", repeats=2)
    first_step = [c for c in result.table if len(c.schedule) == 1]
    assert len(first_step) == 4 and len(result.table) == 4  # every single merge is fast enough
    assert result.best.fidelity["mae"] == min(c.fidelity["mae"] for c in first_step)


@pytest.mark.parametrize("budget", [{}, {"min_fidelity": 0.9, "min_speedup": 2}, {"speed": 2},
                                    {"min_speedup": -1}, 0.97])
def test_bad_budgets(setup, budget):
    model, x = setup
    with pytest.raises(mpm_fx.MPMError, match="budget"):
        mpm_fx.tune(model, x, budget)
