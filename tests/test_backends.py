"""The backends: mpm_inductor (fresh process, entry point, one graph), optimize + Inductor, the
AOTInductor package (fresh process without mpm_fx or model code), and the TensorRT plan."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

import mpm_fx
from mpm_fx.backends import tensorrt_plan
from mpm_fx.models import segmenter
from mpm_fx.models.photos import NAMES, photos

SIZE = 96  # 6 x 6 patches of 16: small compiles, yet photos merge to different counts
# Compiled vs eager: flat regions of real photos give near-duplicate tokens whose similarities
# tie to ~1e-12 even in float64, and compiled code may sum them in another order and pick the
# other twin (SPEC, measured notes). Swapping two near-identical partners moves outputs by
# ~1e-5 (seen once in CI); a wrong merge or gather moves them by O(0.1). Hence 1e-4, not 1e-9.
CLOSE = {"rtol": 1e-4, "atol": 1e-4}


def twenty_photos(size=SIZE, dtype=torch.float64):
    x = photos(NAMES, size, dtype=dtype)
    return torch.cat([x, x[:20 - len(x)].flip(-1)])  # 17 photos + 3 mirrored = 20 images


def one_by_one(optimized, x) -> tuple:
    """Eager outputs of each image alone, concatenated, and each image's token counts."""
    outputs, counts = [], []
    with torch.no_grad():
        for i in range(len(x)):
            outputs.append(optimized(x[i:i + 1]))
            counts.append(optimized.mpm_report().token_counts)
    return torch.cat(outputs), counts


def run_fresh(code: str, tmp_path) -> None:
    script = tmp_path / "fresh.py"
    script.write_text(textwrap.dedent(code))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.compile
def test_mpm_inductor_by_name_in_a_fresh_process_is_one_graph(tmp_path):
    x = twenty_photos()
    torch.save(x, tmp_path / "photos.pt")
    run_fresh(f"""
        import sys
        import timm, torch
        from torch._dynamo.backends.registry import lookup_backend
        from torch._dynamo.utils import counters
        assert "mpm_fx" not in sys.modules

        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="",
                                  img_size={SIZE}).double().eval()
        backend = lookup_backend("mpm_inductor")  # through the entry point
        x = torch.load("photos.pt")
        for fullgraph in (True, False):
            torch._dynamo.reset()
            counters.clear()
            calls = []
            def counting(gm, example_inputs, **kwargs):
                calls.append(kwargs)
                return backend(gm, example_inputs, **kwargs)
            compiled = torch.compile(model, backend=counting, fullgraph=fullgraph,
                                     options={{"schedule": (2, 5)}})
            with torch.no_grad():
                out = torch.cat([compiled(x[i:i + 1]) for i in range(len(x))])
            assert len(calls) == 1, f"{{len(calls)}} compiles for 20 photos"
            assert not counters["graph_break"], dict(counters["graph_break"])
            assert calls[0] == {{"options": {{"schedule": (2, 5)}}}}
            torch.save(out, f"out_{{fullgraph}}.pt")
        assert "mpm_fx" in sys.modules  # loaded by the entry point, not by us
    """, tmp_path)

    torch.manual_seed(0)
    import timm
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="",
                              img_size=SIZE).double().eval()
    expected, counts = one_by_one(mpm_fx.optimize(model, (2, 5)), x)
    with torch.no_grad():
        unmerged = model(x)
    assert len(set(counts)) > 3  # the photos really merge to different token counts
    for fullgraph in (True, False):
        out = torch.load(tmp_path / f"out_{fullgraph}.pt")
        torch.testing.assert_close(out, expected, **CLOSE)
        assert not torch.allclose(out, unmerged, atol=1e-3)  # it merged


@pytest.mark.compile
def test_optimized_module_under_inductor_is_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=SIZE,
                                n_layers=6).double().eval()
    x = twenty_photos()[:6]
    optimized = mpm_fx.optimize(model, (1, 3))  # captured eagerly at the first compiled call
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(optimized, backend=counter)
    config = torch._dynamo.config
    with config.patch(capture_dynamic_output_shape_ops=False, capture_scalar_outputs=False):
        with torch.no_grad():
            out = torch.cat([compiled(x[i:i + 1]) for i in range(len(x))])
        # dynamo kept the merges in the graph without the process-wide flags being left set
        assert not config.capture_dynamic_output_shape_ops and not config.capture_scalar_outputs
    expected, _ = one_by_one(optimized, x)
    assert counter.frame_count == 1 and not counters["graph_break"]
    torch.testing.assert_close(out, expected, **CLOSE)


@pytest.mark.compile
def test_mpm_inductor_takes_integer_images():
    """Prefix detection varies a uint8 image by shuffling it (randn_like had no Byte kernel)."""
    class Uint8Input(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.seg = segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=64,
                                           n_layers=4).eval()

        def forward(self, image):
            return self.seg(image.float() / 255 - 0.5)

    model = Uint8Input().eval()
    image = (photos(("astronaut",), 64) * 40 + 128).clamp(0, 255).to(torch.uint8)
    compiled = torch.compile(model, backend="mpm_inductor", options={"schedule": (1, 2)})
    with torch.no_grad():
        out = compiled(image)
        expected = mpm_fx.optimize(model, (1, 2))(image)
    torch.testing.assert_close(out, expected, **CLOSE)
    assert mpm_fx.optimize(model, (1, 2), example_inputs=image).mpm_report().image_tokens == 16


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


def _program(schedule=(1, 3), batch=1):
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=64,
                                n_layers=4).eval()
    x = torch.randn(batch, 3, 64, 64)
    return mpm_fx.optimize(model, schedule).prepare(x), model, x


def test_tensorrt_plan_keeps_merges_in_pytorch_and_states_token_ranges():
    program, _, _ = _program((1, 3))
    plan = tensorrt_plan(program)
    # 16 image tokens + CLS: the first merge keeps 8..16, the second 1..16 (the op's checks)
    assert plan.token_ranges == ((1 + 8, 1 + 16), (1 + 1, 1 + 16))
    assert "torch.ops.aten.nonzero.default" in plan.torch_executed_ops
    assert plan.pytorch_steps == 2 + 1 + 1  # two merges, one compose, one reconstruction


def test_tensorrt_backend_names_the_install_when_missing():
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch_tensorrt is installed: the missing-package error cannot be shown")
    _, model, x = _program()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"pip install mpm-fx\[tensorrt\]"):
        torch.compile(model, backend="mpm_tensorrt", fullgraph=True)(x)


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None or
                    not torch.cuda.is_available(),
                    reason="TensorRT is not installable in this workplace (NVIDIA's index only) "
                           "and needs a GPU: mpm_tensorrt is untested here")
def test_tensorrt_backend_matches_eager():  # pragma: no cover - needs TensorRT and a GPU
    _, model, x = _program()
    model, x = model.cuda(), x.cuda()
    compiled = torch.compile(model, backend="mpm_tensorrt", options={"schedule": (1, 3)})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mpm_fx.optimize(model, (1, 3))(x),
                                   rtol=1e-2, atol=1e-2)


def test_backend_schedule_errors_are_loud():
    _, model, x = _program()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="block 7 is out of range"):
        torch.compile(model, backend="mpm_inductor", options={"schedule": (7,)})(x)


@pytest.mark.compile
def test_mpm_inductor_size_aware_matches_eager():
    # explicit-softmax attention: the log-size bias meets a data-dependent token count in bmm
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=SIZE,
                                n_layers=6, attention="softmax").double().eval()
    x = photos(("astronaut", "coffee", "chelsea"), SIZE, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mpm_inductor",
                             options={"schedule": (1, 3), "size_aware": True})
    aware, plain = (mpm_fx.optimize(model, (1, 3), size_aware=s) for s in (True, False))
    with torch.no_grad():
        for i in range(len(x)):
            out = compiled(x[i:i + 1])
            torch.testing.assert_close(out, aware(x[i:i + 1]), **CLOSE)
            assert not torch.allclose(out, plain(x[i:i + 1]), atol=1e-6)
