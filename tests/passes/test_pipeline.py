"""The pipeline as a whole: its order, and passes that do not depend on each other giving the
same program in another legal order."""

import pytest
import torch

from mpm_fx.passes import PIPELINE
from mpm_fx.passes.attend_per_image import attend_per_image
from mpm_fx.passes.check_schedule import check_schedule
from mpm_fx.passes.drop_noop_masks import drop_noop_masks
from mpm_fx.passes.follow_token_count import follow_token_count
from mpm_fx.passes.insert_merges import insert_merges
from mpm_fx.passes.insert_reconstructions import insert_reconstructions
from mpm_fx.passes.mask_padded_keys import mask_padded_keys
from mpm_fx.passes.output_token_counts import output_token_counts
from mpm_fx.passes.size_aware_attention import size_aware_attention

from toy import Run, oracle, patches, toy


def test_printed_order():
    assert repr(PIPELINE) == (
        "capture -> analyse -> check_schedule -> drop_noop_masks -> insert_merges -> "
        "insert_reconstructions -> output_encoder -> follow_token_count -> attend_per_image -> "
        "mask_padded_keys -> size_aware_attention -> output_token_counts")


@pytest.mark.parametrize("attention", ["masked", "varlen"])
@pytest.mark.parametrize("softmax", [False, True])
def test_independent_passes_in_another_order(softmax, attention):
    """The passes after follow_token_count each read only the merges and the analysis:
    reversed, they must build the same computation, whether a batch's padding is masked or
    each image attends to its own keys (size-aware attention turns the same SDPA nodes into
    its own form, before or after)."""
    model, x = toy(depth=3, heads=2, softmax=softmax), patches(batch=3)
    head = [check_schedule, drop_noop_masks, insert_merges, insert_reconstructions,
            follow_token_count]
    middle = [attend_per_image, mask_padded_keys, size_aware_attention, output_token_counts]
    options = dict(size_aware=True, attention=attention)
    listed = Run(model, x, (0, 2), passes=head + middle, **options)
    reordered = Run(model, x, (0, 2), passes=head + middle[::-1], **options)
    assert listed.ctx.stats == reordered.ctx.stats
    assert (listed.ctx.stats["varlen_attentions"] > 0) == (attention == "varlen" and not softmax)
    assert Run.ops(listed.after) == Run.ops(reordered.after)
    torch.testing.assert_close(reordered(), listed(), rtol=1e-12, atol=1e-12)


def test_the_pipeline_equals_the_oracle():
    model, x = toy(depth=3, heads=2), patches(batch=3)
    run = Run(model, x, (0, 2))
    torch.testing.assert_close(run(), oracle(model, x, (0, 2)), rtol=1e-12, atol=1e-12)
