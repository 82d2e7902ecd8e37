"""follow_token_count, position-aware: a table indexed by token position (a relative-position
bias, a rotary-like table) that merged blocks read is gathered by the merged tokens' leaders,
against an eager oracle that indexes the table itself, one image at a time."""

import pytest
import torch
import torch.nn.functional as F

import mpm_fx
from mpm_fx import ops
from mpm_fx.passes.mask_padded_keys import mask_padded_keys

from families import Family, HookReference
from toy import Run, Toy, ToyBlock, patches

TOKENS = 13  # 1 CLS + 12 patches


class _TableBlock(ToyBlock):
    """A block reading a learned table indexed by token position:
    "bias":      explicit softmax with a (T, T) bias added to the scores;
    "sdpa_bias": SDPA with a (1, T, T) float bias as attn_mask;
    "rotary":    q and k of the image tokens multiplied by an (N, D) table (CLS untouched).
    ``rows`` (set by the oracle) holds the original position of each token it runs on."""

    def __init__(self, dim, kind):
        super().__init__(dim, softmax=kind == "bias")
        self.kind, self.rows = kind, None
        shape = {"bias": (TOKENS, TOKENS), "sdpa_bias": (1, TOKENS, TOKENS),
                 "rotary": (TOKENS - 1, dim)}[kind]
        self.table = torch.nn.Parameter(torch.randn(shape))

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        rows = torch.arange(x.shape[1]) if self.rows is None else self.rows
        if self.kind == "rotary":
            table = self.table[rows[1:] - 1]
            q = torch.cat([q[:, :1], q[:, 1:] * table], 1)
            k = torch.cat([k[:, :1], k[:, 1:] * table], 1)
            a = F.scaled_dot_product_attention(q, k, v)
        elif self.kind == "sdpa_bias":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.table[:, rows][:, :, rows])
        else:
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + self.table[rows][:, rows]
            a = scores.softmax(-1) @ v
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


def _model(kind, depth=3):
    torch.manual_seed(0)
    model = Toy(depth=depth)
    model.blocks = torch.nn.ModuleList(_TableBlock(8, kind) for _ in range(depth))
    return model.double().eval()


def _rows(block, args, kwargs, rows):
    """The block indexes its own table by its tokens' leaders (CLS keeps position 0)."""
    block.rows = None if rows is None else torch.cat([torch.zeros(1, dtype=torch.long), 1 + rows])
    return args, kwargs


def oracle(model, x, schedule):
    """Eager MPM one image at a time (the family hook reference), every block after a merge
    indexing its table itself."""
    family = Family("toy_tables", model, list(model.blocks), [(model.norm, len(model.blocks))],
                    prefix=1, size=0, positions=_rows)
    return HookReference(family, schedule)(x)[0]


@pytest.mark.parametrize("kind", ["bias", "sdpa_bias", "rotary"])
@pytest.mark.parametrize("batch", [1, 3])
def test_tables_follow_the_leaders(kind, batch):
    model, x = _model(kind), patches(batch=batch)
    schedule = (0, 2)
    run = Run(model, x, schedule)
    # one gather per table and merge point: each of the 3 blocks has its own table (q and k
    # share theirs), all 3 run after a merge
    assert run.ctx.stats["gathered_positions"] == 3
    assert run.added(ops.leaders) == 2
    want = oracle(model, x, schedule)
    torch.testing.assert_close(run(), want, rtol=1e-12, atol=1e-12)
    unmerged = oracle(model, x, ())
    assert (want - unmerged).abs().max() > 1e-3  # the merges changed something


def test_padded_keys_of_a_gathered_sdpa_bias():
    """At batch 3 the SDPA bias is gathered per image, then padded keys get -inf in it."""
    model, x = _model("sdpa_bias"), patches(batch=3)
    run = Run(model, x, (0,))
    assert run.added(ops.mask_keys) == 3 and run.added(ops.key_mask) == 0
    torch.testing.assert_close(run(), oracle(model, x, (0,)), rtol=1e-12, atol=1e-12)


def test_a_table_that_is_zero_now_is_gathered_not_dropped():
    """BEiT starts its tables at zero: dropping a zero bias at capture would run the merged
    blocks without it once real weights are loaded."""
    model, x = _model("bias"), patches()
    for block in model.blocks:
        torch.nn.init.zeros_(block.table)
    optimized = mpm_fx.optimize(model, (1,))
    optimized(x)
    with torch.no_grad():
        for block in model.blocks:
            block.table.normal_()
    torch.testing.assert_close(optimized(x), oracle(model, x, (1,)), rtol=1e-12, atol=1e-12)


def test_a_mask_from_the_inputs_is_refused():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _model("sdpa_bias")

        def forward(self, patches, mask):
            x = torch.cat([self.model.cls.expand(len(patches), -1, -1),
                           self.model.embed(patches)], 1)
            for block in self.model.blocks:
                q, k, v = block.qkv(block.norm1(x)).chunk(3, -1)
                x = x + block.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
                x = x + block.mlp(block.norm2(x))
            return self.model.head(self.model.norm(x)[:, 1:])

    x = patches()
    mask = torch.ones(1, TOKENS, TOKENS, dtype=torch.bool)
    mask[..., -1] = False
    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"computed from the inputs.*mask"):
        mpm_fx.optimize(Masked().eval(), (1,), example_inputs=(x, mask))


def test_mask_padded_keys_runs_after_the_gather():
    from mpm_fx.passes import PIPELINE
    from mpm_fx.passes.follow_token_count import follow_token_count

    assert PIPELINE.index(follow_token_count) < PIPELINE.index(mask_padded_keys)


@pytest.mark.parametrize("kind", ["bias", "sdpa_bias", "rotary"])
def test_size_aware_and_padding_keep_each_image_alone(kind):
    """Gathered tables with size-aware attention and batch padding: each image of a batch of 3
    gets what it gets alone, and size-aware attention changes the result."""
    model, x = _model(kind), patches(batch=3)
    aware = mpm_fx.optimize(model, (0, 2), size_aware=True)
    with torch.no_grad():
        batch = aware(x)
        alone = torch.cat([aware(x[i:i + 1]) for i in range(3)])
        plain = mpm_fx.optimize(model, (0, 2))(x)
    torch.testing.assert_close(batch, alone, rtol=1e-12, atol=1e-12)
    assert (batch - plain).abs().max() > 1e-6
