"""Every merge method through every backend: one mpm_inductor graph (with static shapes for the
counted methods), a .pt2 that runs without mpm_fx, both equal to eager; mpm_tensorrt's split
and ranges."""

import pytest
import torch

import mpm_fx
from mpm_fx.backends import tensorrt_plan
from mpm_fx.backends.inductor import mpm_inductor
from mpm_fx.bench.models import segmenter
from mpm_fx.passes import rewrite

from backend_helpers import CLOSE, SIZE, run_package_fresh, twenty_photos
from fixtures import photos

COUNTED = {"tome": {"method": "tome", "r": (6, 5)},
           "forest": {"method": "forest", "r": (6, 5)},
           "forest_before_block": {"method": "forest", "r": (6, 5), "placement": "before_block"},
           "tome_keys_before_block": {"method": "tome", "r": (6, 5), "placement": "before_block",
                                      "metric": "keys"}}


def _model():
    torch.manual_seed(0)
    return segmenter.segmenter("tiny", decoder="mask", n_cls=4, image_size=SIZE, n_layers=6,
                               decoder_layers=1).double().eval()


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_counted_methods_export_with_static_shapes(name):
    """After a merge that keeps one count, torch.export sees no data-dependent size (MPM's
    counts are unbacked symbols): the program is fully static."""
    model, x = _model(), photos(("astronaut",), SIZE, dtype=torch.float64)
    program = rewrite(model, (x,), {}, (1, 3), token_counts=False,
                      method=mpm_fx.methods.merging(**COUNTED[name]))
    exported = torch.export.export(program.as_module(), (x,), strict=False)
    assert not exported.range_constraints, exported.range_constraints
    mpm = rewrite(model, (x,), {}, (1, 3), token_counts=False)
    assert torch.export.export(mpm.as_module(), (x,), strict=False).range_constraints  # unbacked


@pytest.mark.compile
@pytest.mark.parametrize("name", ["tome_keys_before_block", "forest", "local"])
def test_mpm_inductor_is_one_graph_and_the_package_runs_alone(name, tmp_path):
    """Local MPM too: its tokens' positions come from the merge maps inside the graph (the
    counts per image are data-dependent, as MPM's), never from Python state. ToMe here merges
    before the block on the keys the block would compute (its norm and key rows once more)."""
    model, x = _model(), twenty_photos()
    options = {**COUNTED, "local": {"method": "local", "passes": 2}}[name]  # its loop too
    eager = mpm_fx.optimize(model, (1, 3), **options)
    with torch.no_grad():
        expected = torch.cat([eager(x[i:i + 1]) for i in range(len(x))])
        unmerged = model(x)
    counting, calls = _counting_mpm_inductor()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting, fullgraph=True,
                             options={"schedule": (1, 3), **options})
    with torch.no_grad():
        out = torch.cat([compiled(x[i:i + 1]) for i in range(len(x))])
    assert len(calls) == 1  # one graph for all twenty photos
    torch.testing.assert_close(out, expected, **CLOSE)
    assert not torch.allclose(out, unmerged, atol=1e-3)  # it merged

    package = mpm_fx.aot_compile(model, x[:1], tmp_path / "model.pt2", (1, 3), **options)
    run_package_fresh(package, x[:5], expected[:5], tmp_path)


@pytest.mark.compile
def test_mpm_inductor_with_varlen_attention_is_one_graph_equal_to_eager():
    """attention="varlen" on a padded batch: the per-image attention op is one opaque call of
    known shape inside the one graph, equal to eager's and to the masked path."""
    model = _model()
    x = photos(("astronaut", "coffee", "chelsea", "rocket"), SIZE, dtype=torch.float64)
    with torch.no_grad():
        expected = mpm_fx.optimize(model, (1, 3), attention="masked")(x)
    counting, calls = _counting_mpm_inductor()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting, fullgraph=True,
                             options={"schedule": (1, 3), "attention": "varlen"})
    with torch.no_grad():
        out = compiled(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, expected, **CLOSE)


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_tensorrt_plan_of_counted_methods(name):
    """The engines after each merge take exactly one token count: P + N - r."""
    model, x = _model(), photos(("astronaut", "coffee"), SIZE, dtype=torch.float64)
    program = rewrite(model, (x,), {}, (1, 3), token_counts=False,
                      method=mpm_fx.methods.merging(**COUNTED[name]))
    plan = tensorrt_plan(program)
    assert [kind for _, kind in plan.segments] == ["tensorrt", "pytorch"] * 3 + ["tensorrt"]
    assert plan.token_ranges == ((1 + 30, 1 + 30), (1 + 25, 1 + 25))  # 36 -> 30 -> 25


def _counting_mpm_inductor():
    """mpm_inductor, and the list it appends to once per graph it compiles."""
    calls = []

    def counting(gm, example_inputs, **kwargs):
        calls.append(1)
        return mpm_inductor(gm, example_inputs, **kwargs)
    return counting, calls
