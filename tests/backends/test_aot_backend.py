"""aot_compile: a .pt2 that runs in a fresh process without mpm_fx or the model's code."""

import pytest
import torch

import mpm_fx
from mpm_fx.bench.models import segmenter

from backend_helpers import SIZE, one_by_one, run_package_fresh
from fixtures import photos


@pytest.mark.compile
def test_aot_package_runs_without_mpm_fx_or_model_code(tmp_path):
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="mask", n_cls=4, image_size=SIZE, n_layers=6,
                                decoder_layers=1).eval()
    x = photos(("astronaut", "coffee", "chelsea", "rocket", "camera"), SIZE)
    package = mpm_fx.aot_compile(model, x[:1], tmp_path / "model.pt2", schedule=(1, 3))
    expected, counts = one_by_one(mpm_fx.optimize(model, (1, 3)), x)
    assert len(set(counts)) > 1  # different token counts through one package
    run_package_fresh(package, x, expected, tmp_path)
