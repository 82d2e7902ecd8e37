"""Refusals of structures merging cannot keep exact: each names the real cause, where merges
could still go, and stays quiet (no torch error log before it)."""

import pytest
import torch
from torch import nn

import mpm_fx


class _BiasedBlock(nn.Module):
    """Attention with a learned (T, T) bias (the base of the blocks below)."""

    def __init__(self, dim, tokens):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj, self.mlp = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(tokens, tokens))
        self.return_weights = False

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        weights = (q @ k.transpose(-2, -1) + self.bias).softmax(-1)
        x = x + self.proj(weights @ v)
        return x + self.mlp(self.norm2(x))


def test_a_failing_probe_is_quiet_and_says_where_merges_can_go(capfd):
    """A token-mixing linear layer (over the flattened tokens) in blocks 0 and 1 only: the op
    fails on the merged count; no ERROR log before the error, and merges fit before block 2."""
    class Mixing(_BiasedBlock):
        def __init__(self, dim, tokens, mix):
            super().__init__(dim, tokens)
            self.mix = nn.Linear(tokens * dim, tokens * dim) if mix else None

        def forward(self, x):
            q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
            x = x + self.proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)
            h = self.mlp(self.norm2(x))
            if self.mix is not None:
                h = self.mix(h.flatten(1)).reshape(x.shape)
            return x + h

    blocks = nn.Sequential(*[Mixing(8, 6, mix=i < 2) for i in range(4)]).eval()
    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"blocks 0-1 hold this op: schedule "
                                                      r"merges only before blocks 2..3"):
        mpm_fx.optimize(blocks, (1,), example_inputs=torch.randn(1, 6, 8))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err
    mpm_fx.optimize(blocks, (2,), example_inputs=torch.randn(1, 6, 8))  # as the error says


class _DecomposedRelPos(_BiasedBlock):
    """Explicit-softmax attention on a (B, g*g, C) stream with a decomposed relative-position
    bias added through reshapes of the scores (SAM, MViTv2)."""

    def __init__(self, dim=16, grid=4):
        super().__init__(dim, grid * grid)
        self.grid = grid
        self.rel_h = nn.Parameter(torch.randn(2 * grid - 1, dim))
        self.rel_w = nn.Parameter(torch.randn(2 * grid - 1, dim))

    def forward(self, x):
        B, T, C = x.shape
        g = self.grid
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        idx = torch.arange(g)[:, None] - torch.arange(g)[None, :] + g - 1
        grid_q = q.reshape(B, g, g, C)
        bias_h = torch.einsum("bhwc,hkc->bhwk", grid_q, self.rel_h[idx])
        bias_w = torch.einsum("bhwc,wkc->bhwk", grid_q, self.rel_w[idx])
        scores = (q @ k.transpose(-2, -1)).view(B, g, g, g, g)
        scores = (scores + bias_h[..., None] + bias_w[..., None, :]).view(B, T, T)
        x = x + self.proj(scores.softmax(-1) @ v)
        return x + self.mlp(self.norm2(x))


def test_decomposed_relative_position_bias_is_named():
    blocks = nn.Sequential(*[_DecomposedRelPos() for _ in range(3)]).eval()
    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"4 x 4 grid.*decomposed relative-position"
                       r" bias.*blocks 0-2 hold this op.*no schedule can merge this model"):
        mpm_fx.optimize(blocks, (1,), example_inputs=torch.randn(1, 16, 16))
