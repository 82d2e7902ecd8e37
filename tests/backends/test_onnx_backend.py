"""export_onnx: an ONNX file that ONNX Runtime runs in a fresh process that imports neither mpm_fx
nor torch, equal to eager merging; MPM's merged counts are dynamic dimensions of the file, the
methods that remove a count export static shapes."""

import numpy as np
import onnx
import pytest
import torch

import mpm_fx
from mpm_fx.bench.models import segmenter

from backend_helpers import SIZE, run_fresh
from fixtures import NAMES, photos

SCHEDULE = (1, 3)


def tiny():
    torch.manual_seed(0)
    return segmenter.segmenter("tiny", decoder="mask", n_cls=4, image_size=SIZE, n_layers=6,
                               decoder_layers=1).eval()


def run_onnx_fresh(path, batches: list, expected: list, tmp_path) -> None:
    """Each batch through the file in a fresh process with onnxruntime and numpy only."""
    np.savez(tmp_path / "io.npz", **{f"x{i}": x.numpy() for i, x in enumerate(batches)},
             **{f"y{i}": y.numpy() for i, y in enumerate(expected)})
    run_fresh(f"""
        import sys
        import numpy as np
        import onnxruntime
        io = np.load("io.npz")
        session = onnxruntime.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for i in range({len(batches)}):
            out = session.run(None, {{name: io[f"x{{i}}"]}})[0]
            np.testing.assert_allclose(out, io[f"y{{i}}"], rtol=1e-4, atol=1e-4)
        assert not any(m.split(".")[0] in ("mpm_fx", "torch") for m in sys.modules), "imported"
    """, tmp_path)


def symbolic_dims(path) -> set:
    """The named (dynamic) dimensions of every value of an ONNX file."""
    graph = onnx.load(str(path)).graph
    values = list(graph.value_info) + list(graph.input) + list(graph.output)
    return {d.dim_param for v in values for d in v.type.tensor_type.shape.dim if d.dim_param}


@pytest.mark.compile
@pytest.mark.parametrize("options", [{}, {"method": "local", "passes": 2}], ids=["mpm", "local"])
def test_mpm_batch_runs_in_onnx_runtime_without_mpm_fx(options, tmp_path):
    """A padded batch of 3 through the file equals eager merging (each image as alone), and so
    do 3 other photos whose merged counts differ: the counts are dynamic in the file. Local
    MPM too (its positions from the maps in the file, its second pass a loop unrolled)."""
    model = tiny()
    x = photos(NAMES[:3], SIZE)
    other = photos(NAMES[3:6], SIZE)
    path = mpm_fx.export_onnx(model, x, tmp_path / "model.onnx", schedule=SCHEDULE, **options)
    optimized = mpm_fx.optimize(model, SCHEDULE, **options)
    with torch.no_grad():
        expected = [optimized(x), optimized(other)]
        counts = optimized.mpm_report().token_counts
    assert len(set(counts[0])) > 1  # the images of the second batch merge to different counts
    assert symbolic_dims(path)  # merged token counts: named dimensions, not the example's
    run_onnx_fresh(path, [x, other], expected, tmp_path)


@pytest.mark.compile
@pytest.mark.parametrize("method", ["tome", "forest", "tome:before_block:keys"])
def test_counted_methods_export_static_shapes(method, tmp_path):
    """ToMe before the block on its keys too: the copied norm and the key rows of the block's
    projection (a slice of its weight) in the file."""
    model = tiny()
    x = photos(NAMES[:2], SIZE)
    name, *keys = method.split(":")
    options = {"method": name, "r": (8, 6)} | (
        {"placement": "before_block", "metric": "keys"} if keys else {})
    path = mpm_fx.export_onnx(model, x, tmp_path / "model.onnx", schedule=SCHEDULE, **options)
    assert symbolic_dims(path) == set()
    with torch.no_grad():
        expected = mpm_fx.optimize(model, SCHEDULE, **options)(x)
    run_onnx_fresh(path, [x], [expected], tmp_path)


def test_varlen_attention_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="attention='masked'"):
        mpm_fx.export_onnx(tiny(), photos(NAMES[:2], SIZE), tmp_path / "m.onnx",
                           attention="varlen")


def test_an_untranslatable_op_is_an_error_naming_the_ways_out(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("No ONNX function found for <OpOverload(op='aten.frobnicate')>")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(mpm_fx.MPMError, match=r"aten.frobnicate.*schedule=\(\)"):
        mpm_fx.export_onnx(tiny(), photos(NAMES[:1], SIZE), tmp_path / "m.onnx")
