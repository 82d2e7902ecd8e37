"""mask_padded_keys: at batch > 1 every attention after a merge masks padding keys, so each image
gets its batch-of-one result; at batch 1 nothing changes."""

import pytest
import torch

from mpm_fx import ops
from mpm_fx.passes.check_schedule import check_schedule
from mpm_fx.passes.insert_merges import insert_merges
from mpm_fx.passes.insert_reconstructions import insert_reconstructions
from mpm_fx.passes.mask_padded_keys import mask_padded_keys

from toy import Run, oracle, patches, toy

PASSES = [check_schedule, insert_merges, insert_reconstructions]


@pytest.mark.parametrize("softmax", [False, True])
def test_padding_is_masked_and_images_get_their_own_result(softmax):
    model, x = toy(depth=3, softmax=softmax), patches(batch=3)
    schedule = (1,)
    unmasked = Run(model, x, schedule, passes=PASSES)
    masked = Run(model, x, schedule, passes=PASSES + [mask_padded_keys])
    target = ops.mask_scores if softmax else ops.key_mask
    assert masked.added(target) == 2 and masked.ctx.stats["masked_attentions"] == 2
    expected = oracle(model, x, schedule)
    torch.testing.assert_close(masked(), expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(unmasked(), expected)  # images were padded: the mask matters


def test_nothing_at_batch_one():
    run = Run(toy(), patches(), (1,), passes=PASSES + [mask_padded_keys])
    assert run.added(ops.key_mask) == 0
