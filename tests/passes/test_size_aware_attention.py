"""size_aware_attention: the SDPA node found by the analysis becomes the folded proportional SDPA
in place (the analysis stays true), and the pipeline matches an eager reference that adds
log(size) to the logits by hand; without the option nothing changes."""

import types

import pytest
import torch

import mpm_fx
from mpm_fx.bench.models import segmenter
from mpm_fx.ops import size_aware
from mpm_fx.passes import PIPELINE

from fixtures import photos
from toy import Run, patches, toy


def test_the_analysed_node_is_edited_in_place():
    model, x = toy(depth=3), patches()
    run = Run(model, x, (1,), size_aware=True)
    attention = [b.attention for b in run.ctx.analysis.blocks]
    assert [a.target for a in attention] == [torch.ops.aten.scaled_dot_product_attention.default,
                                             size_aware.proportional_sdpa,
                                             size_aware.proportional_sdpa]
    assert all(a.graph is run.after.graph for a in attention)  # still in the graph
    assert run.ctx.stats["size_aware_attentions"] == 2


def test_off_by_default():
    run = Run(toy(), patches(), (1,), passes=PIPELINE)
    assert run.added(size_aware.proportional_sdpa) == 0


class _Reference:
    """Eager size-aware MPM on our Segmenter, by hooks and a hand-written attention."""

    def __init__(self, model, schedule):
        self.model, self.schedule = model, schedule

    def __call__(self, x):
        return torch.cat([self._one(x[i:i + 1]) for i in range(len(x))])

    def _one(self, x):
        enc = self.model.encoder
        state = {"map": None, "log_sizes": None}

        def merge_before(module, args):
            r = mpm_fx.merge(args[0], prefix=1)
            state["map"] = r.merge_map if state["map"] is None else mpm_fx.compose(
                state["map"], r.merge_map)
            counts = torch.bincount(state["map"][0], minlength=r.valid.shape[1]).double()
            state["log_sizes"] = torch.cat([counts.new_ones(1), counts]).log()[None]
            return (r.tokens,)

        def attention(attn, x):  # softmax(q k^T * scale + log size_j) v
            B, N, C = x.shape
            q, k, v = attn.qkv(x).reshape(B, N, 3, attn.heads, C // attn.heads).permute(
                2, 0, 3, 1, 4)
            logits = (q @ k.transpose(-2, -1)) * attn.scale
            if state["log_sizes"] is not None:
                logits = logits + state["log_sizes"][:, None, None, :]
            return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))

        def rebuild(module, args):
            return (mpm_fx.reconstruct(args[0], state["map"], prefix=1),)

        hooks = [enc.blocks[k].register_forward_pre_hook(merge_before) for k in self.schedule]
        hooks.append(enc.norm.register_forward_pre_hook(rebuild))
        originals = {b.attn: b.attn.forward for b in enc.blocks}
        for block in enc.blocks:
            block.attn.forward = types.MethodType(attention, block.attn)
        try:
            with torch.no_grad():
                return self.model(x)
        finally:
            for h in hooks:
                h.remove()
            for attn, forward in originals.items():
                attn.forward = forward


@pytest.mark.parametrize("attention", ["sdpa", "softmax"])
def test_pass_matches_size_aware_reference_at_batch_1_and_3(attention):
    torch.manual_seed(0)
    model = segmenter.segmenter("tiny", decoder="linear", n_cls=5, image_size=128, n_layers=6,
                                attention=attention).double().eval()
    x = photos(("astronaut", "coffee", "chelsea"), 128, dtype=torch.float64)
    schedule = (1, 3)
    expected = _Reference(model, schedule)(x)
    aware = mpm_fx.optimize(model, schedule, size_aware=True)
    plain = mpm_fx.optimize(model, schedule)
    with torch.no_grad():
        single, batch = aware(x[:1]), aware(x)
        report = aware.mpm_report()
        unaware = plain(x)
    torch.testing.assert_close(single, expected[:1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(batch, expected, rtol=1e-9, atol=1e-9)
    assert report.size_aware_attentions == 6 - schedule[0]
    assert not torch.allclose(batch, unaware, atol=1e-6)  # the option changes the result
