"""insert_merges: one merge before each scheduled block, maps composed, the merged tokens read by
that block only; the tokens equal the op applied to the eager block input."""

import torch

from mpm_fx import ops
from mpm_fx.methods import mpm
from mpm_fx.passes.check_schedule import check_schedule
from mpm_fx.passes.graph import MARK, values_of
from mpm_fx.passes.insert_merges import insert_merges

from toy import Run, patches, toy


def test_a_merge_per_scheduled_block_and_one_composition():
    model, x = toy(depth=3), patches()
    run = Run(model, x, (0, 2), passes=[check_schedule, insert_merges])
    assert run.added(mpm.merge) == 2 and run.added(ops.compose) == 1
    assert Run.ops(run.before)[mpm.merge] == 0
    assert run.ctx.stats["merges"] == 2 and [p.block for p in run.ctx.merges.points] == [0, 2]
    assert all(MARK in n.meta for n in run.after.graph.nodes if n.target in (mpm.merge,
                                                                             ops.compose))


def test_merged_tokens_are_the_op_on_the_block_input_and_only_the_block_reads_them():
    model, x = toy(), patches()
    run = Run(model, x, (1,), passes=[check_schedule, insert_merges])
    point = run.ctx.merges.points[0]
    block = run.ctx.analysis.blocks[1]
    assert all(user in block.body for user in point.tokens.users)
    values = values_of(run.after, [x], [point.tokens, block.input])
    expected = mpm.merge(values[block.input], prefix=1).tokens
    assert torch.equal(values[point.tokens], expected)
    assert values[point.tokens].shape[1] < values[block.input].shape[1]  # it merged
