"""capture: torch.export into a flat ATen graph that takes and returns leaves, parameters as
references to the model's own tensors."""

import contextlib

import pytest
import torch
from torch import nn

import mpm_fx
from mpm_fx.passes.capture import capture

from toy import patches, toy


def test_flat_leaves_in_and_out_and_the_models_own_parameters():
    model, x = toy(), patches()
    captured = capture(model, (x,), {})
    with torch.no_grad():
        out = captured.gm(x)
        assert isinstance(out, (tuple, list)) and torch.equal(out[0], model(x))
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for p in captured.gm.parameters())
    assert captured.in_spec.num_leaves == 1 and captured.out_spec.num_leaves == 1


def test_untraceable_model_is_a_capture_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(mpm_fx.CaptureError, match=r"test_\w+\.py:\d+: `return x \* 2 if x\.sum\(\) > 0 else x` branches in Python "
                       r"on a value computed from the model's inputs"):
        capture(DataDependent().eval(), (torch.randn(2, 3),), {})


def test_shared_captures_trace_once_and_rewrite_as_fresh_ones(monkeypatch):
    """Inside captures_shared a model is traced once: every rewrite of it (methods, schedules,
    in any order, the same setting again after others) gives the graph and the outputs a fresh
    capture gives; a parameter changed in place, other input shapes or a second model are
    traced again; outside, every capture traces."""
    from mpm_fx.methods import merging
    from mpm_fx.passes import rewrite
    from mpm_fx.passes.capture import captures_shared

    traced = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export",
                        lambda *a, **k: traced.append(1) or export(*a, **k))
    model, x = toy(), patches(batch=2)
    settings = [((0,), "mpm", {}), ((0, 1), "tome", {"r": 2}), ((1,), "forest", {"r": 3}),
                ((0, 1), "mpm", {}), ((0,), "mpm", {})]

    def run(schedule, name, options):
        program = rewrite(model, (x,), {}, schedule,
                          method=merging(name, schedule=schedule, **options))
        with torch.no_grad():
            return program.gm.code, program.gm(x)

    fresh = [run(*s) for s in settings]
    assert len(traced) == len(settings)
    traced.clear()
    with captures_shared():
        shared = [run(*s) for s in settings]
        assert len(traced) == 1
        rewrite(model, (patches(batch=1),), {}, (0,), method=merging("mpm", schedule=(0,)))
        assert len(traced) == 2  # other shapes
        with torch.no_grad():
            model.head.weight.add_(0.0)  # in place: a new version of a parameter
        run(*settings[0])
        assert len(traced) == 3
        rewrite(toy(seed=3), (x,), {}, (0,), method=merging("mpm", schedule=(0,)))
        assert len(traced) == 4
    for (code, out), (shared_code, shared_out) in zip(fresh, shared):
        assert shared_code == code
        assert all(torch.equal(a, b) for a, b in zip(out, shared_out))
    run(*settings[0])
    assert len(traced) == 5
    with torch.inference_mode():
        inference = toy()  # tensors with no version: never shared, the capture's own error
    errors = []
    for context in (contextlib.nullcontext(), captures_shared()):
        with context, pytest.raises(Exception) as e:
            rewrite(inference, (x,), {}, (0,), method=merging("mpm", schedule=(0,)))
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]
