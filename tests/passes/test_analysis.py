"""The analysis on whole models: which blocks form the encoder, its taps, its prefix tokens, and
the structures it names when it cannot find an encoder to merge."""

import pytest
import torch
from torch import nn

import mpm_fx
from mpm_fx.passes import analyse
from mpm_fx.passes.capture import capture

import dpt
from families import random_image, tiny_segmenter


def _timm(name, size=224, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval(), torch.randn(1, 3, size, size)


def _analyse(model, x):
    return analyse(capture(model, (x,), {}).gm, [x])


def test_mask_transformer_blocks_are_not_encoder_blocks():
    model = tiny_segmenter(decoder="mask", decoder_layers=2)
    encoder = _analyse(model, random_image())
    assert len(encoder.blocks) == 4  # the 2 decoder blocks on [tokens; class queries] are not
    assert [b.name for b in encoder.blocks] == [f"encoder.blocks.{i}.attn" for i in range(4)]
    assert encoder.tokens == 1 + 16 and len(encoder.taps) == 1 and encoder.taps[0].depth == 4


def test_dpt_taps_at_four_depths():
    model = dpt.DPTSegmenter(image_size=64, depth=8, taps=(1, 3, 5, 7)).double().eval()
    encoder = _analyse(model, random_image())
    assert [t.depth for t in encoder.taps] == [2, 4, 6, 8]
    assert {b.kind for b in encoder.blocks} == {"softmax"}


def test_image_independent_tokens_must_come_first():
    class MiddleToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.seg = tiny_segmenter(decoder="linear")
            self.middle = nn.Parameter(torch.randn(1, 1, 192))

        def forward(self, image):
            enc = self.seg.encoder
            p = enc.patch_embed(image)
            x = torch.cat([p[:, :8], self.middle, p[:, 8:]], 1)
            for block in enc.blocks:
                x = block(x)
            return enc.norm(x)

    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"tokens \[8\] .* not in front"):
        mpm_fx.optimize(MiddleToken().eval(), (1,), example_inputs=random_image())


def test_windowed_attention_on_a_spatial_stream_is_named():
    model, x = _timm("samvit_base_patch16", 64, depth=2, embed_dim=48, num_heads=3, img_size=64,
                     window_size=2, global_attn_indexes=(1,))
    with pytest.raises(mpm_fx.EncoderNotFound, match=r"\(1, 4, 4, 48\).*windowed attention on a "
                                                     r"\(B, H, W, C\) stream"):
        mpm_fx.optimize(model, (1,), example_inputs=x)


def test_parallel_blocks_are_named():
    model, x = _timm("vit_small_patch16_18x2_224", depth=2, embed_dim=48, num_heads=3)
    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"runs 2 attentions in parallel.*"
                                                      r"blocks\.0\.attns\.0\.attn"):
        mpm_fx.optimize(model, (1,), example_inputs=x)


def test_class_attention_taken_for_the_encoder_is_an_error():
    """CaiT: its talking-heads self-attention mixes heads between q kᵀ and the softmax (not
    recognised), its class-attention blocks are, on the class token alone: nothing to merge."""
    model, x = _timm("cait_xxs24_224", depth=2, depth_token_only=2)
    with pytest.raises(mpm_fx.EncoderNotFound, match=r"nothing to merge.*2 blocks \("
                       r"blocks_token_only\.0\.attn.*blocks\.0\.attn \(softmax not recognised"):
        mpm_fx.optimize(model, (1,), example_inputs=x)


def test_integer_images_are_varied_to_find_the_prefix():
    """A model that takes a uint8 image and normalises it inside: prefix detection must vary
    integer inputs too (it used to see no image token and merge nothing, silently)."""
    class Uint8Input(nn.Module):
        def __init__(self):
            super().__init__()
            self.seg = tiny_segmenter(decoder="linear")

        def forward(self, image):
            return self.seg((image.double() / 255 - 0.45) / 0.25)

    model = Uint8Input().eval()
    torch.manual_seed(2)
    image = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    optimized = mpm_fx.optimize(model, (1, 2), example_inputs=image)
    report = optimized.mpm_report()
    assert (report.prefix_tokens, report.image_tokens) == (1, 16)
    reference = mpm_fx.optimize(model.seg, (1, 2))
    with torch.no_grad():
        assert torch.equal(optimized(image), reference((image.double() / 255 - 0.45) / 0.25))
    assert all(max(c) < 16 for c in optimized.mpm_report().token_counts)  # it merged


def test_taps_read_by_top_level_ops_are_named():
    model, x = _timm("vit_tiny_patch16_224", 64, depth=3, img_size=64, global_pool="avg")
    optimized = mpm_fx.optimize(model, (1,), example_inputs=x)
    readers = [r for _, names, _ in optimized.mpm_report().taps for r in names]
    assert readers and all(readers) and any("(top level)" in r for r in readers), readers
    assert "(top level)" in str(optimized.mpm_report())


def test_key_projection_is_the_key_rows_of_the_blocks_own_projection():
    """metric="keys" before a block runs the block's input norm and the key rows of its
    projection again: the k third of timm's fused q/k/v weight, a separate key projection whole
    (HF ViT); rows that are not one range per token are refused with the fix."""
    from transformers import ViTConfig, ViTModel

    from mpm_fx.errors import UnsupportedGraph
    from mpm_fx.passes.analysis import key_projection

    model, x = _timm("vit_tiny_patch16_224", 64, img_size=64)
    block = _analyse(model, x).blocks[1]
    projection = key_projection(block)
    assert (projection.start, projection.stop) == (192, 384)
    assert projection.weight.target == "blocks.1.attn.qkv.weight"
    assert [n.target for n in projection.norm] == [torch.ops.aten.layer_norm.default]

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, image_size=32, patch_size=8)
    torch.manual_seed(0)
    hf = ViTModel(config, add_pooling_layer=False).eval()
    y = torch.randn(1, 3, 32, 32)
    hf_projection = key_projection(_analyse(hf, y).blocks[0])
    assert (hf_projection.start, hf_projection.stop) == (0, 64)
    assert str(hf_projection.weight.target).endswith("k_proj.weight")

    rope, z = _timm("vit_small_patch16_rope_224", 64, img_size=64)  # keys after rotary
    with pytest.raises(UnsupportedGraph, match="placement='after_attention'"):
        key_projection(_analyse(rope, z).blocks[0])
