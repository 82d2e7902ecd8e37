"""The pass's analysis and rewrite rules on small hand-built models, its API, and its errors."""

import pytest
import torch
from torch import nn

import mpm_fx
from mpm_fx.models import dpt, segmenter
from mpm_fx.passes.analysis import find_encoder
from mpm_fx.passes.capture import capture
from mpm_fx.passes.follow_token_count import _groups, probe_counts


def _tiny_segmenter(**kw):
    torch.manual_seed(0)
    kw = {"n_cls": 3, "image_size": 64, "n_layers": 4, **kw}
    return segmenter.segmenter("tiny", **kw).double().eval()


def _image(size=64, batch=1):
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size, dtype=torch.float64)


# -- analysis -------------------------------------------------------------------------------------

def test_mask_transformer_blocks_are_not_encoder_blocks():
    model = _tiny_segmenter(decoder="mask", decoder_layers=2)
    encoder, _ = find_encoder(capture(model, (_image(),), {}).gm)
    assert len(encoder.blocks) == 4  # the 2 decoder blocks on [tokens; class queries] are not
    assert [b.name for b in encoder.blocks] == [f"encoder.blocks.{i}.attn" for i in range(4)]
    assert encoder.tokens == 1 + 16 and len(encoder.taps) == 1 and encoder.taps[0].depth == 4


def test_dpt_taps_at_four_depths():
    model = dpt.DPTSegmenter(image_size=64, depth=8, taps=(1, 3, 5, 7)).double().eval()
    encoder, _ = find_encoder(capture(model, (_image(),), {}).gm)
    assert [t.depth for t in encoder.taps] == [2, 4, 6, 8]
    assert {b.kind for b in encoder.blocks} == {"softmax"}


def test_view_groups_and_probe_counts():
    assert _groups([1, 197, 576], [1, 197, 3, 3, 64]) == [([0], [0]), ([1], [1]), ([2], [2, 3, 4])]
    assert _groups([591, 768], [197, 3, 768]) == [([0], [0, 1]), ([1], [2])]
    for n, prefix in ((196, 1), (1024, 5), (17, 0)):
        counts = probe_counts(n, 3, prefix)
        for before, after in zip([n] + counts, counts):
            assert (before + 1) // 2 <= after < before
        assert all(all((prefix + c) % p for p in range(2, prefix + c)) for c in counts)


# -- the optimized module -------------------------------------------------------------------------

def test_shares_parameters_and_state_dict_keys():
    model = _tiny_segmenter()
    optimized = mpm_fx.optimize(model, (1, 2))
    assert list(optimized.state_dict()) == list(model.state_dict())
    for (name, p), (name2, q) in zip(model.named_parameters(), optimized.named_parameters()):
        assert name == name2 and p is q
    x = _image()
    with torch.no_grad():
        before = optimized(x)
        new_state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        optimized.load_state_dict(new_state)  # loads into the model too: same tensors
        assert torch.equal(model.encoder.cls_token, new_state["encoder.cls_token"])
        after = optimized(x)
        model.load_state_dict(optimized.state_dict())
    assert not torch.equal(before, after)  # the captured graph reads the live parameters


def test_new_shapes_and_dtypes_capture_again():
    model = _tiny_segmenter()
    optimized = mpm_fx.optimize(model, (1,))
    with torch.no_grad():
        a = optimized(_image(batch=1))
        b = optimized(_image(batch=2))
        optimized.float()
        c = optimized(_image(batch=1).float())
    assert a.shape[0] == 1 and b.shape[0] == 2 and c.dtype == torch.float32
    assert optimized.mpm_report().batch == 1


def test_report_describes_the_last_call():
    model = _tiny_segmenter(decoder="linear")
    optimized = mpm_fx.optimize(model, (1, 3), example_inputs=_image())
    with pytest.raises(RuntimeError, match="not been captured"):
        mpm_fx.optimize(model, (1, 3)).mpm_report()
    with torch.no_grad():
        optimized(_image(batch=2))
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
            self.seg = _tiny_segmenter(decoder="linear")

        def forward(self, image, *, scale=1.0):
            tokens = self.seg.encoder(image)
            return {"tokens": tokens * scale, "mask": self.seg.decoder(tokens[:, 1:], (64, 64))}

    model = TwoOutputs().eval()
    optimized = mpm_fx.optimize(model, (2,))
    with torch.no_grad():
        out = optimized(image=_image(), scale=2.0)
        ref = model(image=_image(), scale=2.0)
    assert set(out) == {"tokens", "mask"}
    assert out["tokens"].shape == ref["tokens"].shape and out["mask"].shape == ref["mask"].shape
    assert optimized.mpm_report().taps == ((4, ("seg.encoder.norm",), True),)


# -- errors ---------------------------------------------------------------------------------------

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
        mpm_fx.optimize(_tiny_segmenter(), schedule)


def test_schedule_out_of_range_names_the_block_count():
    model = _tiny_segmenter()
    with pytest.raises(mpm_fx.ScheduleError, match=r"block 4 is out of range: the encoder has 4 "
                       r"blocks \(0..3\).*found has 4 blocks \(encoder\.blocks\.0\.attn, "):
        mpm_fx.optimize(model, (1, 4), example_inputs=_image())
    with pytest.raises(mpm_fx.ScheduleError, match="out of range"):  # or on the first call
        mpm_fx.optimize(model, (9,))(_image())


def test_training_mode_is_refused():
    model = _tiny_segmenter().train()
    with pytest.raises(mpm_fx.TrainingModeError, match=r"model.eval\(\)"):
        mpm_fx.optimize(model)
    optimized = mpm_fx.optimize(model.eval())
    model.encoder.blocks[1].train()
    with pytest.raises(mpm_fx.TrainingModeError, match="encoder.blocks.1"):
        optimized(_image())


def test_untraceable_model():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(mpm_fx.CaptureError, match="could not trace DataDependent"):
        mpm_fx.optimize(DataDependent().eval(), example_inputs=torch.randn(2, 3))


def test_no_attention():
    mixer = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)).eval()
    with pytest.raises(mpm_fx.NoAttentionFound, match="scaled_dot_product_attention"):
        mpm_fx.optimize(mixer, example_inputs=torch.randn(1, 5, 8))


class _BiasedBlock(nn.Module):
    """Attention with a learned (T, T) relative bias: merging cannot keep it."""

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


def test_relative_position_bias_is_reported():
    blocks = nn.Sequential(*[_BiasedBlock(8, 6) for _ in range(3)]).eval()
    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"indexed by token position \(a relative-"
                       r"position bias.*computed from 1.bias.*blocks 0-2 .*no schedule can merge"):
        mpm_fx.optimize(blocks, (1,), example_inputs=torch.randn(1, 6, 8))


def test_attention_weights_leaving_a_merged_block_are_reported():
    class Weights(_BiasedBlock):  # returns its attention weights too
        def forward(self, x):
            q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
            weights = (q @ k.transpose(-2, -1)).softmax(-1)
            x = x + self.proj(weights @ v)
            return x + self.mlp(self.norm2(x)), weights

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Weights(8, 6) for _ in range(3))

        def forward(self, x):
            maps = []
            for block in self.blocks:
                x, w = block(x)
                maps.append(w)
            return x, maps

    with pytest.raises(mpm_fx.UnsupportedGraph, match="reads .* a value inside encoder block 1"):
        mpm_fx.optimize(Leaky().eval(), (1,), example_inputs=torch.randn(1, 6, 8))
    mpm_fx.optimize(Leaky().eval(), (), example_inputs=torch.randn(1, 6, 8))  # no merge: fine


def test_image_independent_tokens_must_come_first():
    class MiddleToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.seg = _tiny_segmenter(decoder="linear")
            self.middle = nn.Parameter(torch.randn(1, 1, 192))

        def forward(self, image):
            enc = self.seg.encoder
            p = enc.patch_embed(image)
            x = torch.cat([p[:, :8], self.middle, p[:, 8:]], 1)
            for block in enc.blocks:
                x = block(x)
            return enc.norm(x)

    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"tokens \[8\] .* not in front"):
        mpm_fx.optimize(MiddleToken().eval(), (1,), example_inputs=_image())


# -- refusals that name the real reason (issue: correctness under faults) ------------------------

def _timm(name, size=224, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval(), torch.randn(1, 3, size, size)


def test_zero_initialised_relative_position_bias_is_refused_not_dropped():
    """timm BEiT starts its relative-position tables at zero: an all-zero bias at capture, but a
    parameter that loading weights changes. Dropping it ran merged blocks without the bias."""
    model, x = _timm("beit_base_patch16_224", depth=3, embed_dim=96, num_heads=3)
    assert all(not b.attn.relative_position_bias_table.any() for b in model.blocks)
    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"relative-position bias.*computed from "
                       r"blocks\.1\.attn\.relative_position_bias_table.*blocks 0-2 read such "
                       r"tensors.*no schedule can merge this model"):
        mpm_fx.optimize(model, (1,), example_inputs=x)


def test_rotary_embedding_is_named_and_the_refusal_is_quiet(capfd):
    model, x = _timm("vit_medium_patch16_rope_reg1_gap_256", 256, depth=3, embed_dim=96,
                     num_heads=3)
    with pytest.raises(mpm_fx.UnsupportedGraph, match=r"rotary position embedding.*blocks 0-2 "
                       r"read such tensors.*no schedule can merge this model"):
        mpm_fx.optimize(model, (1,), example_inputs=x)
    assert "Traceback" not in capfd.readouterr().err


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


def test_windowed_attention_on_a_spatial_stream_is_named():
    model, x = _timm("samvit_base_patch16", 64, depth=2, embed_dim=48, num_heads=3, img_size=64,
                     window_size=2, global_attn_indexes=(1,))
    with pytest.raises(mpm_fx.EncoderNotFound, match=r"\(1, 4, 4, 48\).*windowed attention on a "
                                                     r"\(B, H, W, C\) stream"):
        mpm_fx.optimize(model, (1,), example_inputs=x)


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
            self.seg = _tiny_segmenter(decoder="linear")

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
