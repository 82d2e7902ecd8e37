"""Position-aware merging through the compilers: a timm rotary ViT (its (N, 2 * head_dim) table
gathered by the merged tokens' leaders) as one mpm_inductor graph for images that merge to
different counts, and as an AOTInductor package run in a fresh process without mpm_fx."""

import pytest
import torch

import mpm_fx
from mpm_fx.backends import mpm_inductor

from backend_helpers import CLOSE, SIZE, one_by_one, run_package_fresh, twenty_photos
from fixtures import photos

SCHEDULE = (1, 2)


def _rope_vit(dtype=torch.float64):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_medium_patch16_rope_reg1_gap_256", pretrained=False,
                              num_classes=0, global_pool="", img_size=SIZE, depth=4,
                              embed_dim=96, num_heads=3)
    return model.to(dtype).eval()


@pytest.mark.compile
def test_rotary_vit_is_one_inductor_graph():
    from torch._dynamo.utils import counters

    model, x = _rope_vit(), twenty_photos()[:8]
    expected, counts = one_by_one(mpm_fx.optimize(model, SCHEDULE), x)
    assert len(set(counts)) > 2  # the photos merge to different token counts
    torch._dynamo.reset()
    counters.clear()
    calls = []

    def counting(gm, example_inputs, **kwargs):
        calls.append(len(gm.graph.nodes))
        return mpm_inductor(gm, example_inputs, **kwargs)

    compiled = torch.compile(model, backend=counting, fullgraph=True,
                             options={"schedule": SCHEDULE})
    with torch.no_grad():
        out = torch.cat([compiled(x[i:i + 1]) for i in range(len(x))])
        unmerged = model(x)
    assert len(calls) == 1 and not counters["graph_break"]
    torch.testing.assert_close(out, expected, **CLOSE)
    assert not torch.allclose(out, unmerged, atol=1e-3)  # it merged


@pytest.mark.compile
def test_rotary_vit_aot_package_runs_without_mpm_fx(tmp_path):
    model = _rope_vit(torch.float32)
    x = photos(("astronaut", "coffee", "chelsea", "rocket", "camera"), SIZE)
    package = mpm_fx.aot_compile(model, x[:1], tmp_path / "rope.pt2", schedule=SCHEDULE)
    expected, counts = one_by_one(mpm_fx.optimize(model, SCHEDULE), x)
    assert len(set(counts)) > 1
    run_package_fresh(package, x, expected, tmp_path)
