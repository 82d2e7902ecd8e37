"""check_schedule: indices in range (naming the blocks found), nothing computed inside a merged
block read outside it."""

import pytest
import torch

import mpm_fx
from mpm_fx.passes.check_schedule import check_schedule

from toy import Run, Toy, ToyBlock, patches, toy


def test_out_of_range_names_the_blocks_found():
    with pytest.raises(mpm_fx.ScheduleError, match=r"block 2 is out of range: the encoder has 2 "
                       r"blocks \(0..1\).*found has 2 blocks \(blocks\.0, blocks\.1\)"):
        Run(toy(), patches(), (2,), passes=[check_schedule])


def test_in_range_changes_nothing():
    run = Run(toy(), patches(), (0, 1), passes=[check_schedule])
    assert Run.ops(run.after) == Run.ops(run.before)


class _Weights(ToyBlock):  # returns its attention weights: they leave the block
    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        w = (q @ k.transpose(-2, -1)).softmax(-1)
        x = x + self.proj(w @ v)
        return x + self.mlp(self.norm2(x)), w


class _Leaky(Toy):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Weights(8) for _ in range(3))

    def forward(self, patches):
        x = torch.cat([self.cls.expand(patches.shape[0], -1, -1), self.embed(patches)], 1)
        maps = []
        for block in self.blocks:
            x, w = block(x)
            maps.append(w)
        return x, maps


def test_values_leaving_a_merged_block_are_refused():
    torch.manual_seed(0)
    model = _Leaky().double().eval()
    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"a value inside encoder block 1"):
        Run(model, patches(), (1,), passes=[check_schedule])
    Run(model, patches(), (), passes=[check_schedule])  # no merge: fine
