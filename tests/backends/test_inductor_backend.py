"""mpm_inductor (fresh process, entry point, one graph, integer images, size-aware) and
torch.compile of an optimized module."""

import pytest
import torch

import mpm_fx
from mpm_fx.bench.models import segmenter

from backend_helpers import CLOSE, SIZE, one_by_one, run_fresh, twenty_photos
from fixtures import photos


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


def test_backend_schedule_errors_are_loud():
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=64,
                                n_layers=4).eval()
    x = torch.randn(1, 3, 64, 64)
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
