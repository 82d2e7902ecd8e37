"""EoMT through the backends: one mpm_inductor graph (compiling the optimized module), a .pt2
that runs without mpm_fx."""

import warnings

import pytest
import torch

import mpm_fx

import eomt
from backend_helpers import run_fresh
from fixtures import photos

SCHEDULE = (2, 4)


@pytest.mark.compile
def test_one_mpm_inductor_graph_and_a_package_without_mpm_fx(tmp_path):
    """dynamo cannot trace EoMT's forward whole (its branch on a buffer): the optimized module
    (mpm_fx's capture specialises the branch) compiles under mpm_inductor as one graph; the
    .pt2 runs in a fresh process without mpm_fx and returns the output's tensors flat."""
    import torch.utils._pytree as pytree

    model = eomt.model(128)
    x = photos(("astronaut", "coffee"), 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = mpm_fx.optimize(model, SCHEDULE)
        with torch.no_grad():
            expected = optimized(x[:1])
        calls = []
        from mpm_fx.backends import mpm_inductor

        def counting(gm, example_inputs, **kwargs):
            calls.append(1)
            return mpm_inductor(gm, example_inputs, **kwargs)

        compiled = torch.compile(optimized, backend=counting, fullgraph=True)
        with torch.no_grad():
            out = compiled(x[:1])
        assert len(calls) == 1
        torch.testing.assert_close(out.masks_queries_logits, expected.masks_queries_logits,
                                   rtol=1e-4, atol=1e-4)
        with pytest.warns(UserWarning, match="flat tuple of its 3 tensors"):
            package = mpm_fx.aot_compile(model, x[:1], tmp_path / "eomt.pt2", SCHEDULE)
    torch.save({"x": x[:1], "leaves": pytree.tree_leaves(expected)}, tmp_path / "io.pt")
    run_fresh(f"""
        import sys
        import torch
        runner = torch._inductor.aoti_load_package({str(package)!r})
        io = torch.load("io.pt")
        out = runner(io["x"])
        assert len(out) == len(io["leaves"]) == 3
        for a, b in zip(out, io["leaves"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert not any(m.startswith("mpm_fx") for m in sys.modules), "mpm_fx was imported"
    """, tmp_path)


def test_a_graph_break_is_named_with_the_fix():
    """Without fullgraph, dynamo breaks EoMT's forward at the branch on its own buffer and
    mpm_inductor receives one block at a time: the error says so, where, and what to do
    (not "block 2 is out of range")."""
    model = eomt.model(128)
    with pytest.raises(Exception, match=r"GraphBreakError.*fragment.*modeling_eomt\.py:\d+.*"
                                        r"mpm_fx\.optimize\(model, schedule\)"):
        with torch.no_grad():
            torch.compile(model, backend="mpm_inductor",
                          options={"schedule": SCHEDULE})(torch.randn(1, 3, 128, 128))
