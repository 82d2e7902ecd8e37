"""mpm_fx.tune: the schedule it returns meets its budget, and its table is what it measured."""

import random
import statistics

import pytest
import torch
from torch import nn

import mpm_fx
from mpm_fx.bench.models import segmenter
from mpm_fx.costs import CostModel, measure
from mpm_fx.fidelity import compare

from fixtures import photos


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="linear", n_cls=4, image_size=96,
                                n_layers=4).eval()
    return model, photos(("astronaut", "coffee", "chelsea"), 96)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Cached cost models of these tests go to a fresh folder (none left behind)."""
    monkeypatch.setenv("MPM_FX_CACHE", str(tmp_path / "cache"))


def test_fastest_schedule_within_a_fidelity_budget(setup):
    model, x = setup
    result = mpm_fx.tune(model, x, {"min_fidelity": 0.9}, repeats=3, methods=("mpm",))
    assert result.best is not None and result.best.fidelity["pixel_agreement"] >= 0.9
    feasible = [c for c in result.table if c.fidelity["pixel_agreement"] >= 0.9]
    assert result.best.speedup == max(c.speedup for c in feasible)
    # the table holds what an independent run gives
    optimized = mpm_fx.optimize(model, **result.setting())
    with torch.no_grad():
        agreement = statistics.mean(compare(model(x[i:i + 1]), optimized(x[i:i + 1]))
                                    ["pixel_agreement"] for i in range(len(x)))
    assert agreement == pytest.approx(result.best.fidelity["pixel_agreement"], abs=1e-12)
    assert "chosen" in str(result)
    # cost-model ranking: every latency is the prediction from the candidate's own counts
    assert result.rank == "cost_model" and result.measured["speedup"] > 0
    for c in result.table:
        assert c.speedup == pytest.approx(result.costs.unmerged_ms / c.latency_ms)


def test_methods_and_counts_searched_twice_give_one_answer_and_a_front(setup):
    """policy x schedule x count: every method and fraction is searched; the chosen setting
    meets the budget and its fidelity is what optimize gives it; the Pareto front holds no
    candidate that another beats on both axes; a second search (the cost model read from the
    cache) returns the same setting and the same table."""
    model, x = setup
    kw = dict(methods=("mpm", "tome", "forest"), fractions=(0.2, 0.4), max_merges=1, repeats=2)
    first = mpm_fx.tune(model, x, {"min_fidelity": 0.85}, **kw)
    assert {c.method for c in first.table} == {"mpm", "tome", "forest"}
    forest = {c.method_options["r"][0] for c in first.table if c.method == "forest"}
    assert forest == {7, 14}  # of 36
    assert first.best.fidelity["pixel_agreement"] >= 0.85
    feasible = [c for c in first.table if c.fidelity["pixel_agreement"] >= 0.85]
    assert first.best.speedup == max(c.speedup for c in feasible)
    optimized = mpm_fx.optimize(model, **first.setting())
    with torch.no_grad():
        agreement = statistics.mean(compare(model(x[i:i + 1]), optimized(x[i:i + 1]))
                                    ["pixel_agreement"] for i in range(len(x)))
    assert agreement == pytest.approx(first.best.fidelity["pixel_agreement"], abs=1e-12)
    for c in first.front:
        assert not any(o.speedup > c.speedup and o.fidelity["pixel_agreement"] >
                       c.fidelity["pixel_agreement"] for o in first.table)
    assert first.best in first.front
    second = mpm_fx.tune(model, x, {"min_fidelity": 0.85}, **kw)
    assert second.setting() == first.setting()
    assert [(c.setting(), c.speedup) for c in second.table] == [
        (c.setting(), c.speedup) for c in first.table]


def test_the_chosen_setting_is_checked_on_images_the_search_never_saw(setup):
    """check_images: the chosen setting's fidelity on other photos, as an independent run of
    it gives; the search's own table and choice do not depend on them."""
    model, x = setup
    other = photos(("rocket", "camera"), 96)
    kw = dict(repeats=2, methods=("mpm", "forest"), fractions=(0.2,), max_merges=2)
    plain = mpm_fx.tune(model, x, {"min_fidelity": 0.85}, **kw)
    checked = mpm_fx.tune(model, x, {"min_fidelity": 0.85}, check_images=other, **kw)
    assert plain.checked is None and checked.setting() == plain.setting()
    optimized = mpm_fx.optimize(model, **checked.setting())
    with torch.no_grad():
        expected = [compare(model(other[i:i + 1]), optimized(other[i:i + 1]))
                    for i in range(len(other))]
    for metric in ("pixel_agreement", "iou", "mae"):
        assert checked.checked[metric] == pytest.approx(
            statistics.mean(e[metric] for e in expected), abs=1e-12)
    assert len(checked.checked["per_image"]) == 2 and "never saw" in str(checked)


def test_measured_ranking(setup):
    model, x = setup
    result = mpm_fx.tune(model, x, {"min_fidelity": 0.9}, rank="measured", repeats=2,
                         max_merges=1, methods="mpm")
    assert result.measured is None and result.costs is None and len(result.table) == 4
    feasible = [c for c in result.table if c.fidelity["pixel_agreement"] >= 0.9]
    assert result.best.speedup == max(c.speedup for c in feasible)


def test_cost_model_arithmetic_against_a_loop():
    # 4 blocks, 1 prefix token, 8 image tokens; costs only at counts the runs use (no interpolation)
    costs = CostModel(depth=4, prefix=1, image_tokens=8,
                      block_ms={9: 10.0, 6: 7.0, 4: 4.5, 3: 3.0},
                      merge_ms={8: 2.0, 5: 1.5, 3: 1.0}, unmerged_ms=100.0)
    # merge before 1 (8 -> 5) and 3 (5 -> 3): blocks run 8, 5, 5, 3 image tokens
    blocks = 10.0 + 7.0 + 7.0 + 4.5 - 0 * 3.0
    expected = 100.0 - 4 * 10.0 + blocks + 2.0 + 1.5
    assert costs.merged_ms((1, 3), (5, 3)) == pytest.approx(expected)
    assert costs.bound((1, 3), (5, 3))["encoder"] == pytest.approx(40.0 / (blocks + 3.5))
    assert costs.predicted_merge_share((1, 3), (5, 3), 80.0) == pytest.approx(3.5 / 80.0)
    assert costs.block(5.0) == pytest.approx((4.5 + 7.0) / 2)  # between measured counts
    with pytest.raises(mpm_fx.MPMError, match="one token count per merge"):
        costs.merged_ms((1, 3), (5,))


def test_bound_is_none_when_noise_makes_the_timings_disagree():
    """A busy machine can time the blocks alone above the whole model: the bound is then
    unknown (printed "n/a (noise)"), never negative; predictions stay positive for ranking."""
    costs = CostModel(depth=4, prefix=1, image_tokens=8, block_ms={9: 10.0, 5: 6.0, 3: 4.0},
                      merge_ms={8: 2.0, 4: 1.0}, unmerged_ms=30.0)  # blocks alone: 40 ms
    assert not costs.consistent
    bound = costs.bound((1, 3), (4, 2))
    assert bound["model"] is None and bound["encoder"] == pytest.approx(
        40.0 / costs.encoder_ms((1, 3), (4, 2)))
    assert costs.merged_ms((1, 3), (4, 2)) == pytest.approx(costs.encoder_ms((1, 3), (4, 2)))
    fine = CostModel(4, 1, 8, costs.block_ms, costs.merge_ms, unmerged_ms=50.0)
    assert fine.consistent and fine.bound((1, 3), (4, 2))["model"] > 1


def test_percentiles_lie_within_the_samples():
    from mpm_fx.bench.common import p10_p90_ms, ratio_text

    samples = [100.0, 101.0, 99.0, 400.0, 98.0]  # the default quantile method gave < 98 here
    p10, p90 = p10_p90_ms(samples)
    assert min(samples) <= p10 <= p90 <= max(samples)
    assert p10_p90_ms([5.0]) == [5.0, 5.0]
    assert ratio_text(None) == "n/a (noise)" and ratio_text(1.234) == "1.23x"


def test_interleaved_runs_every_fn_once_per_round_and_settles_before_each_timed_call(
        monkeypatch):
    """The order of calls is round after round, every fn once (after the warm-up rounds); with
    ``settle`` each timed call comes after one sleep of that length, without it after none."""
    from mpm_fx import costs

    calls, sleeps = [], []
    monkeypatch.setattr(costs.time, "sleep", lambda s: (sleeps.append(s), calls.append("sleep")))
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = costs.interleaved(fns, 3, warmup=1)
    assert sleeps == [] and calls == list("abc") * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    calls.clear()
    costs.interleaved(fns, 2, warmup=1, settle=0.02)
    assert calls == list("abc") + ["sleep", "a", "sleep", "b", "sleep", "c"] * 2
    assert sleeps == [0.02] * 6


def test_cost_model_measures_the_real_block(setup):
    model, x = setup
    costs = measure(model, x[:1], tokens=(4, 18), repeats=2)
    assert (costs.depth, costs.prefix, costs.image_tokens) == (4, 1, 36)
    assert sorted(costs.block_ms) == [5, 19, 37] and sorted(costs.merge_ms) == [4, 18, 36]
    assert costs.encoder_ms() == pytest.approx(4 * costs.block_ms[37] + 0)
    assert costs.unmerged_ms > 0 and costs.block_ms[37] > 0  # times themselves: not asserted


def test_cost_model_refuses_blocks_that_take_masks():
    class Block(segmenter.Block):
        def forward(self, x, bias):  # a token-sized tensor inside the block
            x = x + self.attn(self.norm1(x) + bias)
            return x + self.mlp(self.norm2(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block(8, 2, 16) for _ in range(2))

        def forward(self, x):
            bias = torch.zeros(x.shape[1], 1)
            for b in self.blocks:
                x = b(x, bias)
            return x

    with pytest.raises(mpm_fx.MPMError, match="rank='measured'"):
        measure(Model().eval(), torch.randn(1, 6, 8), repeats=1)


def test_most_faithful_schedule_within_a_latency_budget(setup):
    model, x = setup
    result = mpm_fx.tune(model, x, {"max_latency_ms": 1e9}, metric="mae", repeats=2,
                         methods="mpm")
    first_step = [c for c in result.table if len(c.schedule) == 1]
    assert len(first_step) == 4 and len(result.table) == 4  # every single merge is fast enough
    assert result.best.fidelity["mae"] == min(c.fidelity["mae"] for c in first_step)


@pytest.mark.parametrize("budget", [{}, {"min_fidelity": 0.9, "min_speedup": 2}, {"speed": 2},
                                    {"min_speedup": -1}, 0.97])
def test_bad_budgets(setup, budget):
    model, x = setup
    with pytest.raises(mpm_fx.MPMError, match="budget"):
        mpm_fx.tune(model, x, budget)


@pytest.mark.parametrize("seed", range(20))
def test_ties_in_speed_go_to_the_more_faithful_and_the_choice_is_on_the_front(seed):
    """The cost model gives one speed-up to every setting that leaves the same counts: among
    equally fast settings the more faithful is chosen, and the chosen one is on the front
    (which holds, checked by brute force, every setting no other beats on both axes)."""
    from mpm_fx.tuning import Candidate, _Goal
    rng = random.Random(seed)
    table = [Candidate((k,), {"pixel_agreement": rng.choice((0.8, 0.9, 0.95))}, 1.0,
                       rng.choice((0.9, 1.1, 1.3)), (), rng.choice(("tome", "forest")))
             for k in range(8)]
    goal = _Goal("min_fidelity", 0.85, "pixel_agreement")
    chosen = None
    for i in range(0, 8, 2):  # as greedy's steps see them
        chosen, _ = goal.step(table[i:i + 2], chosen)
    feasible = [c for c in table if c.fidelity["pixel_agreement"] >= 0.85]
    if not feasible:
        return
    top = max(c.speedup for c in feasible)
    assert chosen.speedup == top
    assert chosen.fidelity["pixel_agreement"] == max(
        c.fidelity["pixel_agreement"] for c in feasible if c.speedup == top)
    front = goal.front(table)
    assert chosen in front

    def beaten(c):
        return any((o.speedup, o.fidelity["pixel_agreement"]) != (c.speedup, c.fidelity[
            "pixel_agreement"]) and o.speedup >= c.speedup and o.fidelity["pixel_agreement"]
            >= c.fidelity["pixel_agreement"] for o in table)
    points = {(c.speedup, c.fidelity["pixel_agreement"]) for c in table if not beaten(c)}
    assert sorted(points) == sorted((c.speedup, c.fidelity["pixel_agreement"]) for c in front)
