"""insert_reconstructions: a gather in front of every tap after a merge; with the merges alone the
toy then computes what the eager oracle does (its single-head blocks name no token count)."""

import torch

from mpm_fx import ops
from mpm_fx.passes.check_schedule import check_schedule
from mpm_fx.passes.insert_merges import insert_merges
from mpm_fx.passes.insert_reconstructions import insert_reconstructions

from toy import Run, oracle, patches, toy

PASSES = [check_schedule, insert_merges, insert_reconstructions]


def test_one_gather_per_tap_after_a_merge_and_the_oracles_output():
    model, x = toy(), patches()
    run = Run(model, x, (1,), passes=PASSES)
    assert run.added(ops.reconstruct) == 1 and run.ctx.stats["reconstructed_taps"] == 1
    torch.testing.assert_close(run(), oracle(model, x, (1,)), rtol=1e-12, atol=1e-12)


def test_no_gather_for_a_tap_before_the_first_merge():
    run = Run(toy(), patches(), (), passes=PASSES)
    assert run.added(ops.reconstruct) == 0
