"""drop_noop_masks: constants made while tracing that mask nothing are dropped from the merged
blocks (HF transformers' all-True masks, all-zero biases); position-indexed tensors computed from
parameters are kept, even when they are zero now."""

import torch
import torch.nn.functional as F

from mpm_fx.passes.check_schedule import check_schedule
from mpm_fx.passes.drop_noop_masks import drop_noop_masks
from mpm_fx.passes.graph import sdpa_args
from mpm_fx.passes.insert_merges import insert_merges
from mpm_fx.passes.insert_reconstructions import insert_reconstructions

from toy import Run, Toy, ToyBlock, oracle, patches

PASSES = [check_schedule, drop_noop_masks, insert_merges, insert_reconstructions]


class _AllTrueMask(ToyBlock):
    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device)  # masks nothing
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        return x + self.mlp(self.norm2(x))


class _ZeroBias(ToyBlock):
    def __init__(self, dim, tokens, learned=False):
        super().__init__(dim, softmax=True)
        zeros = torch.zeros(tokens, tokens)
        self.bias = torch.nn.Parameter(zeros) if learned else None

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        bias = self.bias if self.bias is not None else torch.zeros(T, T, dtype=x.dtype)
        x = x + self.proj(((q @ k.transpose(-2, -1)) + bias).softmax(-1) @ v)
        return x + self.mlp(self.norm2(x))


def _toy_with(block):
    torch.manual_seed(0)
    model = Toy()
    model.blocks = torch.nn.ModuleList(block() for _ in range(2))
    return model.double().eval()


def test_all_true_mask_is_dropped_where_merged():
    model, x = _toy_with(lambda: _AllTrueMask(8)), patches()
    run = Run(model, x, (1,), passes=PASSES)
    masks = [sdpa_args(b.attention).get("attn_mask") for b in run.ctx.analysis.blocks]
    assert masks[0] is not None and masks[1] is None  # block 0 runs unmerged: left alone
    assert run.ctx.stats["dropped_masks"] == 1
    torch.testing.assert_close(run(), oracle(model, x, (1,)), rtol=1e-12, atol=1e-12)


def test_zero_bias_constant_is_dropped():
    model, x = _toy_with(lambda: _ZeroBias(8, 13)), patches()
    run = Run(model, x, (0,), passes=PASSES)
    assert run.ctx.stats["dropped_masks"] == 2
    torch.testing.assert_close(run(), oracle(model, x, (0,)), rtol=1e-12, atol=1e-12)


def test_zero_learned_bias_is_kept():
    """A bias from a parameter is kept even when it is zero now (weights may be loaded later):
    follow_token_count gathers it for the merged tokens (tests/passes/test_position_tables.py)."""
    model, x = _toy_with(lambda: _ZeroBias(8, 13, learned=True)), patches()
    run = Run(model, x, (1,), passes=PASSES)
    assert run.ctx.stats["dropped_masks"] == 0
    assert sum(n.op == "get_attr" and n.target.endswith(".bias") and n.target.startswith("blocks")
               and not n.target.endswith("qkv.bias") for n in run.after.graph.nodes) >= 2
