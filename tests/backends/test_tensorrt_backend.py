"""mpm_tensorrt: the split at the pipeline's marked nodes and the engines' token ranges, tested
with a stand-in segment compiler (TensorRT itself cannot be installed here)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import mpm_fx
from mpm_fx.backends import partition, tensorrt_plan
from mpm_fx.backends.tensorrt import PYTORCH_ROLES, mpm_tensorrt
from mpm_fx.bench.models import segmenter
from mpm_fx.methods import mpm
from mpm_fx.passes import rewrite
from mpm_fx.passes.graph import MARK


def _model():
    torch.manual_seed(0)
    return segmenter.segmenter("tiny", decoder="linear", n_cls=3, image_size=64,
                               n_layers=4).eval()


def test_only_the_marked_merge_nodes_run_in_pytorch():
    """Segments alternate; a PyTorch segment holds only merges, compositions and gathers, and
    no such node is left in a TensorRT segment (nor is any other op of the model moved)."""
    model, x = _model(), torch.randn(2, 3, 64, 64)
    program = rewrite(model, (x,), {}, (1, 3), token_counts=False)
    split = partition(program.gm)
    plan = tensorrt_plan(program)
    assert [kind for _, kind in plan.segments] == ["tensorrt", "pytorch"] * 3 + ["tensorrt"]
    for name, kind in plan.segments:
        roles = {n.meta.get(MARK) for n in getattr(split, name).graph.nodes
                 if n.op == "call_function"}
        assert (roles <= PYTORCH_ROLES) if kind == "pytorch" else not roles & PYTORCH_ROLES
    with torch.no_grad():
        assert torch.equal(split(x)[0], program.gm(x)[0])  # the same computation
    # 16 image tokens + CLS: the first merge keeps 8..16, the second 1..16 (the op's checks)
    assert plan.token_ranges == ((1 + 8, 1 + 16), (1 + 1, 1 + 16))
    assert mpm.token_bounds(16, whole=True) == (8, 16)


@pytest.mark.parametrize("batch", [1, 2])
def test_backend_compiles_each_segment_with_the_merged_token_dim_unbacked(batch):
    """The backend under torch.compile, with a stand-in for torch-tensorrt: every TensorRT
    segment after a merge receives fake inputs whose token dim is the merge's unbacked size
    (at batch 1 too, where a segment returns it only inside P + M); the result equals eager
    MPM."""
    model, x = _model(), torch.randn(batch, 3, 64, 64)
    seen = []

    def compile_segment(segment, inputs, **options):
        assert options == {}  # no dry run asked
        seen.append([t.shape[1] for t in inputs if isinstance(t, torch.Tensor) and t.dim() == 3
                     and t.shape[0] == batch])
        return segment

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, example: mpm_tensorrt(
        gm, example, {"schedule": (1, 3)}, compile_segment=compile_segment))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mpm_fx.optimize(model, (1, 3))(x), rtol=1e-5,
                                   atol=1e-5)
    assert len(seen) == 4
    assert all(not isinstance(n, int) for n in seen[1] + seen[2])  # after a merge: symbolic


def test_a_dry_run_gathers_every_segments_report_in_one_file(tmp_path):
    """dryrun="file": each TensorRT segment is asked for its own report (torch-tensorrt's
    dry run writes one per call), and the file holds them in order, with the PyTorch segments
    between them named."""
    model, x = _model(), torch.randn(1, 3, 64, 64)
    path = tmp_path / "coverage.txt"

    def compile_segment(segment, inputs, dryrun=None):
        Path(dryrun).write_text(f"report of {Path(dryrun).suffix[1:]}: "
                                f"{len(segment.graph.nodes)} nodes\n")
        return segment

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=lambda gm, example: mpm_tensorrt(
        gm, example, {"schedule": (1, 3), "dryrun": str(path)}, compile_segment=compile_segment))
    with torch.no_grad():
        compiled(x)
    text = path.read_text()
    assert text.startswith("mpm_tensorrt: ") and text.count(": TensorRT\n") == 4
    assert text.count(": PyTorch (merge, compose, reconstruct)") == 3
    assert text.index("report of submod_0") < text.index("report of submod_2")
    assert list(tmp_path.iterdir()) == [path]  # the segments' own files gathered and removed


def test_tensorrt_backend_names_the_install_when_missing():
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch_tensorrt is installed: the missing-package error cannot be shown")
    model, x = _model(), torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"pip install 'mpm-fx\[tensorrt\]'.*CUDA GPU"):
        torch.compile(model, backend="mpm_tensorrt", fullgraph=True)(x)


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None or
                    not torch.cuda.is_available(),
                    reason="TensorRT engines need a CUDA GPU (and pip install "
                           "'mpm-fx[tensorrt]'): mpm_tensorrt end to end is untested here")
def test_tensorrt_backend_matches_eager():  # pragma: no cover - needs TensorRT and a GPU
    model, x = _model().cuda(), torch.randn(1, 3, 64, 64).cuda()
    compiled = torch.compile(model, backend="mpm_tensorrt", options={"schedule": (1, 3)})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mpm_fx.optimize(model, (1, 3))(x),
                                   rtol=1e-2, atol=1e-2)
