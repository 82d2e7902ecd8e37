"""capture: torch.export into a flat ATen graph that takes and returns leaves, parameters as
references to the model's own tensors."""

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
