"""output_token_counts and output_encoder: the extra outputs a program appends after the model's,
named by ``Program.extras``."""

import torch

import mpm_fx
from mpm_fx.passes import rewrite

from toy import patches, toy


def test_token_counts_are_each_images_merged_count():
    model, x = toy(depth=3), patches(batch=3)
    program = rewrite(model, (x,), {}, (0, 2))
    assert program.extras == ("token_counts",)
    with torch.no_grad():
        out, extras = program.split(program.gm(x))
    counts = extras["token_counts"]
    assert counts.shape == (2, 3) and out.shape == (3, 12, 3)
    with torch.no_grad():  # the first merge runs on the embedding of each image alone
        for i in range(3):
            stream = torch.cat([model.cls, model.embed(x[i:i + 1])], 1)
            assert counts[0, i] == mpm_fx.merge(stream, prefix=1).valid.sum()
    assert (counts[1] <= counts[0]).all() and (counts[0] < 12).all()


def test_encoder_outputs_are_the_rebuilt_tokens_and_the_maps():
    model, x = toy(), patches(batch=2)
    program = rewrite(model, (x,), {}, (1,), token_counts=False, encoder_outputs=True)
    assert program.extras == ("encoder_tokens", "map_1")
    plain = rewrite(model, (x,), {}, (), token_counts=False, encoder_outputs=True)
    with torch.no_grad():
        out, extras = program.split(program.gm(x))
        _, unmerged = plain.split(plain.gm(x))
        # the head reads the norm of the image tokens of exactly these rebuilt tokens
        torch.testing.assert_close(model.head(model.norm(extras["encoder_tokens"])[:, 1:]), out)
    assert extras["map_1"].shape == (2, 12) and extras["map_1"].max() < 12
    assert unmerged["encoder_tokens"].shape == extras["encoder_tokens"].shape == (2, 13, 8)
