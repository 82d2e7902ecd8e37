"""The public API: ``mpm_fx.optimize`` and its module (shared parameters, captures per input
signature, the report, keyword inputs and nested outputs) and its errors."""

import pytest
import torch
from torch import nn

import mpm_fx

from families import random_image, tiny_segmenter


def test_shares_parameters_and_state_dict_keys():
    model = tiny_segmenter()
    optimized = mpm_fx.optimize(model, (1, 2))
    assert list(optimized.state_dict()) == list(model.state_dict())
    for (name, p), (name2, q) in zip(model.named_parameters(), optimized.named_parameters()):
        assert name == name2 and p is q
    x = random_image()
    with torch.no_grad():
        before = optimized(x)
        new_state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        optimized.load_state_dict(new_state)  # loads into the model too: same tensors
        assert torch.equal(model.encoder.cls_token, new_state["encoder.cls_token"])
        after = optimized(x)
        model.load_state_dict(optimized.state_dict())
    assert not torch.equal(before, after)  # the captured graph reads the live parameters


def test_new_shapes_and_dtypes_capture_again():
    model = tiny_segmenter()
    optimized = mpm_fx.optimize(model, (1,))
    with torch.no_grad():
        a = optimized(random_image(batch=1))
        b = optimized(random_image(batch=2))
        optimized.float()
        c = optimized(random_image(batch=1).float())
    assert a.shape[0] == 1 and b.shape[0] == 2 and c.dtype == torch.float32
    assert optimized.mpm_report().batch == 1


def test_report_describes_the_last_call():
    model = tiny_segmenter(decoder="linear")
    optimized = mpm_fx.optimize(model, (1, 3), example_inputs=random_image())
    with pytest.raises(RuntimeError, match="not been captured"):
        mpm_fx.optimize(model, (1, 3)).mpm_report()
    with torch.no_grad():
        optimized(random_image(batch=2))
    report = optimized.mpm_report()
    assert report.schedule == (1, 3) and report.prefix_tokens == 1 and report.image_tokens == 16
    assert len(report.token_counts) == 2 and len(report.token_counts[0]) == 2
    assert all(8 <= a <= 16 and (a + 1) // 2 <= b <= a for a, b in zip(*report.token_counts))
    assert report.taps == ((4, ("encoder.norm",), True),)
    assert "merge before" in str(report)


def test_keyword_inputs_and_nested_outputs():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.seg = tiny_segmenter(decoder="linear")

        def forward(self, image, *, scale=1.0):
            tokens = self.seg.encoder(image)
            return {"tokens": tokens * scale, "mask": self.seg.decoder(tokens[:, 1:], (64, 64))}

    model = TwoOutputs().eval()
    optimized = mpm_fx.optimize(model, (2,))
    with torch.no_grad():
        out = optimized(image=random_image(), scale=2.0)
        ref = model(image=random_image(), scale=2.0)
    assert set(out) == {"tokens", "mask"}
    assert out["tokens"].shape == ref["tokens"].shape and out["mask"].shape == ref["mask"].shape
    assert optimized.mpm_report().taps == ((4, ("seg.encoder.norm",), True),)


@pytest.mark.parametrize("schedule, message", [
    ((2, 2), "appears twice"),
    ((1.5,), "not an int"),
    ((True,), "bool"),
    ((-1,), "negative"),
    ("2,5", "sequence of block indices"),
    (5, "sequence of block indices"),
])
def test_bad_schedules_fail_at_optimize(schedule, message):
    with pytest.raises(mpm_fx.ScheduleError, match=message):
        mpm_fx.optimize(tiny_segmenter(), schedule)


def test_schedule_out_of_range_names_the_block_count():
    model = tiny_segmenter()
    with pytest.raises(mpm_fx.ScheduleError, match=r"block 4 is out of range: the encoder has 4 "
                       r"blocks \(0..3\).*found has 4 blocks \(encoder\.blocks\.0\.attn, "):
        mpm_fx.optimize(model, (1, 4), example_inputs=random_image())
    with pytest.raises(mpm_fx.ScheduleError, match="out of range"):  # or on the first call
        mpm_fx.optimize(model, (9,))(random_image())


def test_training_mode_is_refused():
    model = tiny_segmenter().train()
    with pytest.raises(mpm_fx.TrainingModeError, match=r"model.eval\(\)"):
        mpm_fx.optimize(model)
    optimized = mpm_fx.optimize(model.eval())
    model.encoder.blocks[1].train()
    with pytest.raises(mpm_fx.TrainingModeError, match="encoder.blocks.1"):
        optimized(random_image())


def test_untraceable_model():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(mpm_fx.CaptureError, match=r"test_\w+\.py:\d+: `return x \* 2 if x\.sum\(\) > 0 else x` branches in Python "
                       r"on a value computed from the model's inputs"):
        mpm_fx.optimize(DataDependent().eval(), example_inputs=torch.randn(2, 3))


def test_no_attention():
    mixer = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)).eval()
    with pytest.raises(mpm_fx.NoAttentionFound, match="scaled_dot_product_attention"):
        mpm_fx.optimize(mixer, example_inputs=torch.randn(1, 5, 8))
