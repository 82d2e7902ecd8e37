"""follow_token_count: after a merge, size literals that were the token count become expressions
of the tensors' own sizes; the probe's helpers (view grouping, prime probe counts)."""

import torch

from mpm_fx.passes.check_schedule import check_schedule
from mpm_fx.passes.follow_token_count import _groups, follow_token_count, probe_counts
from mpm_fx.passes.graph import MARK
from mpm_fx.passes.insert_merges import insert_merges
from mpm_fx.passes.insert_reconstructions import insert_reconstructions

from toy import Run, oracle, patches, toy

PASSES = [check_schedule, insert_merges, insert_reconstructions]


def test_multi_head_reshapes_follow_the_merged_count():
    model, x = toy(heads=2), patches()
    static = Run(model, x, (1,), passes=PASSES)
    followed = Run(model, x, (1,), passes=PASSES + [follow_token_count])
    sizes = [n for n in followed.after.graph.nodes if n.meta.get(MARK) == "size"]
    assert followed.ctx.stats["symbolic_sizes"] >= 4 and sizes  # q, k, v and the output
    assert followed.added(torch.ops.aten.sym_size.int) > 0
    try:
        static()
        raise AssertionError("the static graph ran on merged tokens")
    except RuntimeError:
        pass  # reshape(..., [1, 13, 2, 4]) of fewer tokens
    torch.testing.assert_close(followed(), oracle(model, x, (1,)), rtol=1e-12, atol=1e-12)


def test_view_groups_and_probe_counts():
    assert _groups([1, 197, 576], [1, 197, 3, 3, 64]) == [([0], [0]), ([1], [1]), ([2], [2, 3, 4])]
    assert _groups([591, 768], [197, 3, 768]) == [([0], [0, 1]), ([1], [2])]
    for n, prefix in ((196, 1), (1024, 5), (17, 0)):
        counts = probe_counts(n, 3, prefix)
        for before, after in zip([n] + counts, counts):
            assert (before + 1) // 2 <= after < before
        assert all(all((prefix + c) % p for p in range(2, prefix + c)) for c in counts)
