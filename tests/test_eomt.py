"""EoMT end to end, and what it needed of the capture: a forward that branches on its own buffer
(specialised, and captured again when the buffer changes), scalars of the model's state inside
merged blocks, and learned query tokens that join the stream after the encoder."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mpm_fx

import eomt
from fixtures import photos

SCHEDULE = (2, 4)
PREFIX = 5  # CLS + 4 registers
QUERIES = 10


def _model():
    return eomt.model(128, queries=QUERIES).double()


def _images(n=3):
    return photos(("astronaut", "coffee", "chelsea")[:n], 128, dtype=torch.float64)


def hook_reference(model, x, schedule=SCHEDULE):
    """MPM before the scheduled layers (pre-hooks), and the full grid rebuilt at the output of
    the last layer before the queries join (a forward hook), so that the join, the mask
    predictions and the query layers all read every token. One image at a time."""
    outs = []
    first_query_layer = len(model.layers) - model.config.num_blocks
    for i in range(len(x)):
        state = {"map": None}

        def merge(module, args, kwargs):
            r = mpm_fx.merge(args[0], prefix=PREFIX)
            state["map"] = r.merge_map if state["map"] is None else mpm_fx.compose(
                state["map"], r.merge_map)
            return (r.tokens,) + args[1:], kwargs

        def rebuild(module, args, output):
            return mpm_fx.reconstruct(output, state["map"], prefix=PREFIX)

        handles = [model.layers[k].register_forward_pre_hook(merge, with_kwargs=True)
                   for k in schedule]
        handles.append(model.layers[first_query_layer - 1].register_forward_hook(rebuild))
        try:
            with torch.no_grad():
                outs.append(model(x[i:i + 1]))
        finally:
            for h in handles:
                h.remove()
    return (torch.cat([o.masks_queries_logits for o in outs]),
            torch.cat([o.class_queries_logits for o in outs]))


def test_eomt_matches_hook_reference_at_batch_1_and_3():
    model, x = _model(), _images()
    masks, classes = hook_reference(model, x)
    with pytest.warns(UserWarning, match=r"specialised 1 Python branch.*modeling_eomt\.py:\d+.*"
                                         r"attn_mask_probs"):
        optimized = mpm_fx.optimize(model, SCHEDULE, example_inputs=x[:1])
    with torch.no_grad():
        single = optimized(x[:1])
        batch = optimized(x)
    for out, n in ((single, 1), (batch, 3)):
        torch.testing.assert_close(out.masks_queries_logits, masks[:n], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.class_queries_logits, classes[:n], rtol=1e-9, atol=1e-9)
    report = optimized.mpm_report()
    assert len(report.blocks) == 6 and report.prefix_tokens == PREFIX  # the blocks before
    assert report.joins == (f"{QUERIES} learned tokens join the stream in front after block 5 "
                            f"({report.joins[0].split('(')[1]}",)
    assert "modeling_eomt.py" in report.joins[0]
    assert len(report.specialized) == 1 and "attn_mask_probs" in report.specialized[0]
    assert "branch specialised on the model's own values" in str(report)
    with torch.no_grad():
        plain = model(x)
    assert not torch.allclose(batch.masks_queries_logits, plain.masks_queries_logits)


def test_post_processing_reads_the_optimized_outputs():
    import transformers

    model, x = _model(), _images(2)
    optimized = mpm_fx.optimize(model, SCHEDULE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = optimized(x)
    segmentation = transformers.EomtImageProcessor().post_process_semantic_segmentation(
        out, target_sizes=[(128, 128)] * 2)
    with torch.no_grad():
        semantic = eomt.SemanticEoMT(optimized)(x)
    assert [s.shape for s in segmentation] == [(128, 128)] * 2
    assert torch.equal(torch.stack(segmentation), semantic.argmax(1))


def test_a_schedule_after_the_join_names_it():
    model, x = _model(), _images(1)
    with pytest.raises(mpm_fx.ScheduleError, match=r"block 6 is out of range: the encoder has 6 "
                       r"blocks.*10 learned tokens join the stream in front after block 5.*"
                       r"merges go before block 6"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mpm_fx.optimize(model, (2, 6), example_inputs=x)


def test_a_changed_buffer_captures_again():
    """The specialised branch is part of the cache key: a buffer changed in place, by
    load_state_dict, or replaced (assign=True) gives a new capture, never a stale branch."""
    model, x = _model(), _images(1)
    optimized = mpm_fx.optimize(model, SCHEDULE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            optimized(x)
            first = optimized.mpm_report()
            model.attn_mask_probs.fill_(1.0)  # mask annealing on: the other branch
            annealed = optimized(x)
        masks, _ = hook_reference(model, x)
        torch.testing.assert_close(annealed.masks_queries_logits, masks, rtol=1e-9, atol=1e-9)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["attn_mask_probs"].zero_()
        model.load_state_dict(state)
        with torch.no_grad():
            back = optimized(x)
        masks, _ = hook_reference(model, x)
        torch.testing.assert_close(back.masks_queries_logits, masks, rtol=1e-9, atol=1e-9)
        state["attn_mask_probs"] = torch.ones(2, dtype=torch.float64)
        model.load_state_dict(state, assign=True)
        with torch.no_grad():
            again = optimized(x)
        masks, _ = hook_reference(model, x)
        torch.testing.assert_close(again.masks_queries_logits, masks, rtol=1e-9, atol=1e-9)
    assert first.specialized


class _Block(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.heads = heads
        self.register_buffer("gain", torch.tensor(2.0))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(a) * self.gain.item()  # a scalar of the model's state, read by item()
        return x + self.mlp(self.norm2(x))


class _Toy(nn.Module):
    """Patch tokens, four blocks, then learned queries joining (in front or at the end) for two
    more blocks; ``branch_on``: a Python branch on a buffer or on the input."""

    def __init__(self, queries_at="front", branch_on=None):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, stride=8)
        self.blocks = nn.ModuleList(_Block() for _ in range(6))
        self.queries = nn.Parameter(torch.randn(1, 3, 32))
        self.queries_at, self.branch_on = queries_at, branch_on
        self.register_buffer("enabled", torch.tensor(0.0))

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        for i, block in enumerate(self.blocks):
            if i == 4:
                q = self.queries.expand(len(t), -1, -1)
                t = torch.cat([q, t] if self.queries_at == "front" else [t, q], 1)
            if i == 2 and self.branch_on == "buffer" and self.enabled > 0:
                t = t * 2
            if i == 2 and self.branch_on == "input" and x.mean() > 100:  # an input value
                t = t * 2
            t = block(t)
        q = t[:, :3] if self.queries_at == "front" else t[:, -3:]
        image = t[:, 3:] if self.queries_at == "front" else t[:, :-3]
        return torch.einsum("bqc,bnc->bqn", q, image)


@pytest.mark.parametrize("queries_at", ["front", "end"])
def test_queries_that_join_end_the_encoder_in_either_order(queries_at):
    torch.manual_seed(0)
    model = _Toy(queries_at, branch_on="buffer").double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = mpm_fx.optimize(model, (1, 3), example_inputs=x)
    report = optimized.mpm_report()
    where = "in front" if queries_at == "front" else "at the end"
    assert len(report.blocks) == 4 and report.joins[0].startswith(
        f"3 learned tokens join the stream {where} after block 3")
    state = {"map": None}

    def merge(module, args):
        r = mpm_fx.merge(args[0])
        state["map"] = r.merge_map if state["map"] is None else mpm_fx.compose(state["map"],
                                                                               r.merge_map)
        return (r.tokens,)

    def rebuild(module, args, output):  # the last block before the join: every token back
        return mpm_fx.reconstruct(output, state["map"])

    expected = []
    for i in range(2):
        state["map"] = None
        handles = [model.blocks[k].register_forward_pre_hook(merge) for k in (1, 3)]
        handles.append(model.blocks[3].register_forward_hook(rebuild))
        with torch.no_grad():
            expected.append(model(x[i:i + 1]))
        for h in handles:
            h.remove()
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), torch.cat(expected), rtol=1e-9, atol=1e-9)
    assert optimized.mpm_report().symbolic_sizes > 0  # item() of the gain never blocked it


def test_a_branch_on_an_input_value_is_refused_with_its_line():
    torch.manual_seed(0)
    model = _Toy(branch_on="input").eval()
    with pytest.raises(mpm_fx.CaptureError,
                       match=r"test_eomt\.py:\d+: `if i == 2 and self\.branch_on == \"input\" and "
                             r"x\.mean\(\) > 100:.*computed from the model's inputs"):
        mpm_fx.optimize(model, (1,), example_inputs=torch.randn(1, 3, 64, 64))


def test_mpm_bench_takes_eomt_as_a_model(tmp_path):
    """`mpm-bench --models eomt:segmenter` (tests/eomt.py): random weights, so only what
    holds whatever they are: the encoder found (CLS + 4 registers, the blocks before the
    queries join) and the token counts of an independent optimize."""
    import json

    from mpm_fx.bench import cli

    from fixtures import NAMES

    rc = cli.main(["run", "--models", "eomt:segmenter", "--sizes", "128",
                   "--schedules", "2,4", "--photos", "1", "--repeats", "2", "--classes", "2",
                   "--out", str(tmp_path)])
    assert rc == 0
    m = json.loads((tmp_path / "run.json").read_text())["models"][0]
    model = eomt.segmenter(128)
    optimized = mpm_fx.optimize(model, (2, 4))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized(photos(NAMES[:1], 128))
    report = optimized.mpm_report()
    assert (m["image_tokens"], m["prefix_tokens"]) == (report.image_tokens, 5)
    assert m["blocks"] == len(report.blocks)
    assert m["fidelity"]["(2, 4)"]["tokens"] == [c[0] for c in report.token_counts]
