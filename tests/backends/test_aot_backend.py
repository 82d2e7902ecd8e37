"""aot_compile: a .pt2 that runs in a fresh process without mpm_fx or the model's code."""

import pytest
import torch

import mpm_fx
from mpm_fx.bench.models import segmenter
from mpm_fx.bench.models.photos import photos

from backend_helpers import SIZE, one_by_one, run_fresh


@pytest.mark.compile
def test_aot_package_runs_without_mpm_fx_or_model_code(tmp_path):
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="mask", n_cls=4, image_size=SIZE, n_layers=6,
                                decoder_layers=1).eval()
    x = photos(("astronaut", "coffee", "chelsea", "rocket", "camera"), SIZE)
    package = mpm_fx.aot_compile(model, x[:1], tmp_path / "model.pt2", schedule=(1, 3))
    expected, counts = one_by_one(mpm_fx.optimize(model, (1, 3)), x)
    assert len(set(counts)) > 1  # different token counts through one package
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    run_fresh(f"""
        import sys
        import torch
        runner = torch._inductor.aoti_load_package({str(package)!r})
        io = torch.load("io.pt")
        out = torch.cat([runner(io["x"][i:i + 1]) for i in range(len(io["x"]))])
        torch.testing.assert_close(out, io["expected"], rtol=1e-4, atol=1e-4)
        assert not any(m.startswith("mpm_fx") for m in sys.modules), "mpm_fx was imported"
    """, tmp_path)
