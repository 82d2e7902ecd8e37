"""Model families the pass must handle, and an independent eager reference for each.

The reference does not use the pass: forward hooks apply the SPEC op (``mpm_fx.merge``) before
the scheduled block modules, snapshot the composed merge map after each block, and rebuild the
full token grid (``mpm_fx.reconstruct``) in front of the decoder modules that read encoder
tokens. It runs one image at a time, so batch results are checked against batch-1 results.
Which modules are blocks and taps is test knowledge; the pass finds them from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mpm_fx
import mpm_fx.ops
from mpm_fx.bench.models import focus, segmenter
from mpm_fx.methods import merging

import dpt  # tests/dpt.py


@dataclass
class Family:
    name: str
    model: nn.Module  # float64, eval
    blocks: list  # encoder block modules, in order
    taps: list  # (module whose *input* is encoder tokens, depth: index of the block it follows)
    prefix: int
    size: int  # input side in pixels
    # position-aware families: positions(block, args, kwargs, rows) -> (args, kwargs) gives a
    # block the position tables of the tokens it runs on: rows (M,) are the original image-token
    # indices of its tokens' leaders, None for the unmerged tokens (then it must restore them)
    positions: object = None


class TokenHead(nn.Module):
    """A segmentation head on a token backbone: drop prefix tokens, linear per patch, upsample."""

    def __init__(self, backbone, features, dim, prefix, patch, classes=5):
        super().__init__()
        self.backbone, self.features = backbone, features
        self.prefix, self.patch = prefix, patch
        self.classify = nn.Linear(dim, classes)

    def forward(self, x):
        B, _, H, W = x.shape
        tokens = self.features(self.backbone, x)[:, self.prefix:]
        logits = self.classify(tokens).transpose(1, 2).reshape(B, -1, H // self.patch,
                                                              W // self.patch)
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)


class ConvHead(TokenHead):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        dim = self.classify.in_features
        self.classify = nn.Identity()
        self.conv = nn.Sequential(nn.Conv2d(dim, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 5, 1))

    def forward(self, x):
        B, _, H, W = x.shape
        tokens = self.features(self.backbone, x)[:, self.prefix:]
        grid = tokens.transpose(1, 2).reshape(B, -1, H // self.patch, W // self.patch)
        return F.interpolate(self.conv(grid), size=(H, W), mode="bilinear", align_corners=False)


def _timm(name, prefix, size, patch=16, randomize_layerscale=False, **kw):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **kw)
    if randomize_layerscale:  # DINOv2 LayerScale starts at 1e-5: make it matter
        for n, p in vit.named_parameters():
            if n.endswith("gamma"):
                p.data.uniform_(0.2, 1.0)
    head = TokenHead(vit, lambda m, x: m.forward_features(x), vit.embed_dim, prefix, patch)
    return Family(name, _ready(head), list(vit.blocks), [(vit.norm, len(vit.blocks))], prefix, size)


def _torchvision():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(224, 16, num_layers=8, num_heads=4, hidden_dim=192, mlp_dim=768)

    def features(m, x):
        tokens = m._process_input(x)
        return m.encoder(torch.cat([m.class_token.expand(x.shape[0], -1, -1), tokens], 1))

    head = ConvHead(vit, features, 192, 1, 16)
    layers = list(vit.encoder.layers)
    return Family("torchvision_vit", _ready(head), layers, [(vit.encoder.ln, len(layers))], 1, 224)


def _hf(kind, attn="sdpa"):
    import transformers

    torch.manual_seed(0)
    if kind == "vit":
        cfg = transformers.ViTConfig(hidden_size=96, num_hidden_layers=8, num_attention_heads=3,
                                     intermediate_size=384, image_size=256, patch_size=16,
                                     attn_implementation=attn)
        model, patch = transformers.ViTModel(cfg, add_pooling_layer=False), 16
    else:
        cfg = transformers.Dinov2Config(hidden_size=96, num_hidden_layers=8, num_attention_heads=3,
                                        mlp_ratio=4, image_size=224, patch_size=14,
                                        layerscale_value=0.5, attn_implementation=attn)
        model, patch = transformers.Dinov2Model(cfg), 14
    size = 16 * patch
    head = TokenHead(model, lambda m, x: m(pixel_values=x).last_hidden_state, 96, 1, patch)
    layers = list(model.layers if hasattr(model, "layers") else model.encoder.layer)
    return Family(f"hf_{kind}_{attn}", _ready(head), layers, [(model.layernorm, len(layers))],
                  1, size)


def _segmenter(decoder, attention):
    torch.manual_seed(0)
    seg = segmenter.segmenter("tiny", decoder=decoder, n_cls=7, image_size=224,
                              attention=attention)
    blocks = list(seg.encoder.blocks)
    return Family(f"segmenter_{decoder}_{attention}", _ready(seg), blocks,
                  [(seg.encoder.norm, len(blocks))], 1, 224)


def _dpt():
    torch.manual_seed(0)
    model = dpt.DPTSegmenter(image_size=224, taps=(2, 5, 8, 11))
    blocks = list(model.blocks)
    taps = [(norm, k + 1) for norm, k in zip(model.norms, model.taps)]
    return Family("dpt_explicit_softmax", _ready(model), blocks, taps, 1, 224)


def _focus():
    model = focus.load(224, dtype=torch.float64)
    blocks = list(model.backbone.blocks)
    return Family("real_dinov2_s14_focus", model, blocks,
                  [(model.backbone.norm, len(blocks))], 1, 224)


def _ready(model):
    return model.double().eval()


# -- position-aware families: their own tables indexed by the leaders, by hand ----------------------

def _rope_rows(block, args, kwargs, rows):
    """timm Eva/rope ViTs pass the (N, 2 * head_dim) rotary table to every block."""
    if rows is not None:
        kwargs = {**kwargs, "rope": kwargs["rope"][rows]}
    return args, kwargs


def _dinov3_rows(block, args, kwargs, rows):
    """HF DINOv3 passes (cos, sin), each (N, head_dim), to every layer."""
    if rows is not None:
        kwargs = {**kwargs, "position_embeddings": tuple(t[rows] for t in
                                                          kwargs["position_embeddings"])}
    return args, kwargs


def _beit_rows(prefix):
    def positions(block, args, kwargs, rows):
        """timm BEiT computes a (1, H, T, T) bias inside each attention: index rows and columns."""
        attn = block.attn
        attn.__dict__.pop("_get_rel_pos_bias", None)
        if rows is not None:
            index = torch.cat([torch.arange(prefix), prefix + rows])
            bias = type(attn)._get_rel_pos_bias
            attn._get_rel_pos_bias = lambda: bias(attn)[..., index, :][..., index]
        return args, kwargs
    return positions


def _timm_rope(size=128):
    family = _timm("vit_medium_patch16_rope_reg1_gap_256", 1, size, depth=8, embed_dim=96,
                   num_heads=3)
    family.name, family.positions = "timm_rope_reg1", _rope_rows
    return family


def _timm_beit(size=128):
    family = _timm("beit_base_patch16_224", 1, size, depth=8, embed_dim=96, num_heads=3)
    torch.manual_seed(2)
    for block in family.blocks:  # BEiT starts its tables at zero: make them matter
        block.attn.relative_position_bias_table.data.normal_(0, 1)
    family.name, family.positions = "timm_beit_relative_bias", _beit_rows(1)
    return family


def _hf_dinov3(size=128):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DINOv3ViTConfig(hidden_size=96, num_hidden_layers=8, num_attention_heads=3,
                                       intermediate_size=384, image_size=size, patch_size=16,
                                       num_register_tokens=4, layerscale_value=0.5)
    model = transformers.DINOv3ViTModel(cfg)
    head = TokenHead(model, lambda m, x: m(pixel_values=x).last_hidden_state, 96, 5, 16)
    layers = list(model.model.layer)
    return Family("hf_dinov3_registers", _ready(head), layers, [(model.norm, len(layers))], 5,
                  size, _dinov3_rows)


class RopeDPT(nn.Module):
    """A DPT-style decoder reading several blocks of a timm rotary encoder: a LayerNorm per tap,
    the taps' image tokens concatenated and classified per patch."""

    def __init__(self, size=128, taps=(2, 4, 5, 7), classes=5):
        super().__init__()
        import timm

        self.vit = timm.create_model("vit_medium_patch16_rope_reg1_gap_256", pretrained=False,
                                     num_classes=0, img_size=size, depth=8, embed_dim=96,
                                     num_heads=3)
        self.taps = taps
        self.norms = nn.ModuleList(nn.LayerNorm(96) for _ in taps)
        self.fuse = nn.Linear(96 * len(taps), classes)

    def forward(self, x):
        B, _, H, W = x.shape
        tokens, rope = self.vit._pos_embed(self.vit.patch_embed(x))
        tokens, features = self.vit.norm_pre(tokens), []
        for i, block in enumerate(self.vit.blocks):
            tokens = block(tokens, rope=rope)
            if i in self.taps:
                features.append(self.norms[self.taps.index(i)](tokens)[:, 1:])
        logits = self.fuse(torch.cat(features, -1)).transpose(1, 2).reshape(B, -1, H // 16, W // 16)
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)


def _rope_dpt():
    torch.manual_seed(0)
    model = RopeDPT()
    blocks = list(model.vit.blocks)
    taps = [(norm, k + 1) for norm, k in zip(model.norms, model.taps)]
    return Family("dpt_rope_taps", _ready(model), blocks, taps, 1, 128, _rope_rows)


FACTORIES = {
    "timm_vit_tiny": lambda: _timm("vit_tiny_patch16_224", 1, 224),
    "timm_vit_small": lambda: _timm("vit_small_patch16_224", 1, 160),
    "timm_vit_base": lambda: _timm("vit_base_patch16_224", 1, 128),
    "timm_deit_distilled": lambda: _timm("deit_tiny_distilled_patch16_224", 2, 224),
    "timm_registers": lambda: _timm("vit_tiny_patch16_224", 5, 224, reg_tokens=4),
    "timm_dinov2_layerscale": lambda: _timm("vit_small_patch14_reg4_dinov2", 5, 224, patch=14,
                                            randomize_layerscale=True),
    "torchvision_vit": _torchvision,
    "hf_vit_sdpa": lambda: _hf("vit"),
    "hf_vit_eager": lambda: _hf("vit", "eager"),
    "hf_dinov2_sdpa": lambda: _hf("dinov2"),
    "segmenter_mask": lambda: _segmenter("mask", "softmax"),
    "segmenter_linear": lambda: _segmenter("linear", "sdpa"),
    "dpt_explicit_softmax": _dpt,
    "real_dinov2_s14": _focus,
    "timm_rope_reg1": _timm_rope,
    "timm_beit_relative_bias": _timm_beit,
    "hf_dinov3_registers": _hf_dinov3,
    "dpt_rope_taps": _rope_dpt,
}


class HookReference:
    """Eager merging around the family's own modules, one image at a time.

    ``method`` (a ``mpm_fx.methods.Merging``, default plain MPM) says which op merges and where:
    before a block (a pre-hook replaces its input), or between its attention and MLP: the keys
    of the block's attention are caught as it runs (the first SDPA or matmul call inside it),
    a hook on the module that ends the attention branch turns h = x + branch into the merged
    tokens rebuilt to the full grid (what the MLP, a per-token map, then computes on is the
    same), and a hook on the block's output keeps one row per merged token."""

    def __init__(self, family: Family, schedule, method=None):
        self.family, self.schedule = family, tuple(schedule)
        self.method = method or merging("mpm")

    def __call__(self, x):
        outs, counts = [], []
        for i in range(x.shape[0]):
            out, c = self._one(x[i:i + 1])
            outs.append(out)
            counts.append(c)
        return torch.cat(outs), [list(c) for c in zip(*counts)]  # counts: per merge, per image

    def _one(self, x):
        fam, P, method = self.family, self.family.prefix, self.method
        state = {"map": None, "sizes": None, "at": {}, "counts": [], "input": None, "keys": None}

        def merge(tokens, k, metric=None):
            i = self.schedule.index(k)
            sizes = state["sizes"] if method.uses_sizes else None
            options = method.kwargs(i)
            if method.uses_positions:  # the families' patch grids are square
                side = int(round((tokens.shape[1] - P) ** 0.5)) if state["map"] is None else (
                    int(round(state["map"].shape[1] ** 0.5)))
                options = {**options, "total_map": state["map"], "grid": (side, side)}
            r = method.op(tokens, prefix=P, sizes=sizes, metric=metric, **options)
            state["map"] = r.merge_map if state["map"] is None else mpm_fx.compose(state["map"],
                                                                                   r.merge_map)
            state["sizes"] = mpm_fx.ops.token_sizes(state["map"], r.valid)
            state["counts"].append(int(r.valid.sum()))
            return r

        def stream_of(args, kwargs):
            return kwargs["hidden_states"] if not args else args[0]

        def with_stream(args, kwargs, tokens):
            if not args:
                return args, {**kwargs, "hidden_states": tokens}
            return (tokens,) + args[1:], kwargs

        def merge_before(k):
            def hook(module, args, kwargs):
                if state.get("probing"):
                    return None  # the block running once for its keys (below)
                tokens = stream_of(args, kwargs)
                metric = keys_of(module, args, kwargs, tokens) if method.metric == "keys" else None
                return with_stream(args, kwargs, merge(tokens, k, metric).tokens)
            return hook

        def keys_of(module, args, kwargs, tokens):  # metric="keys" before the block: the keys
            state["probing"], state["keys"] = True, None  # of the block run on the unmerged
            try:                                          # tokens, every head side by side
                with _FirstKeys(state):
                    module(*args, **kwargs)
            finally:
                state["probing"] = False
            keys, transposed = state["keys"]
            keys = keys.transpose(-2, -1) if transposed else keys
            B, T = tokens.shape[0], keys.shape[-2]
            return keys.reshape(B, -1, T, keys.shape[-1]).transpose(1, 2).reshape(B, T, -1)

        def catch_keys(module, args, kwargs):  # after_attention: the block's input and its keys
            state["input"], state["keys"] = stream_of(args, kwargs), None
            state["catcher"] = _FirstKeys(state)
            state["catcher"].__enter__()

        def merge_after_attention(k):
            def hook(module, args, output):
                state["catcher"].__exit__(None, None, None)
                branch = output[0] if isinstance(output, tuple) else output
                x_in = state["input"]
                h = x_in + branch
                keys, transposed = state["keys"]
                metric = mpm_fx.ops.key_metric(keys, h, transposed=transposed)
                r = merge(h, k, metric)
                full = mpm_fx.reconstruct(r.tokens, r.merge_map, prefix=P)
                state["rows"] = torch.cat([torch.arange(P), P + _first_of_each_group(
                    r.merge_map[0])])
                new = full - x_in  # so that x + branch is the rebuilt merged h
                return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
            return hook

        def keep_merged_rows(module, args, output):
            return output[:, state["rows"]]

        def snapshot(depth):
            def hook(module, args, output):
                state["at"][depth] = state["map"]
            return hook

        def rebuild(depth):
            def hook(module, args):
                total = state["at"].get(depth)
                if total is None:
                    return None
                return (mpm_fx.reconstruct(args[0], total, prefix=P),) + args[1:]
            return hook

        def positions(module, args, kwargs):
            rows = None if state["map"] is None else _first_of_each_group(state["map"][0])
            return fam.positions(module, args, kwargs, rows)

        handles = []
        for k in self.schedule:
            block = fam.blocks[k]
            if method.placement == "before_block":
                handles.append(block.register_forward_pre_hook(merge_before(k), with_kwargs=True))
            else:
                handles.append(block.register_forward_pre_hook(catch_keys, with_kwargs=True))
                handles.append(attention_branch_end(block).register_forward_hook(
                    merge_after_attention(k)))
                handles.append(block.register_forward_hook(keep_merged_rows))
        if fam.positions is not None:  # after the merge hook: it sees the block's own tokens
            handles += [b.register_forward_pre_hook(positions, with_kwargs=True) for b in fam.blocks]
        for depth, block in enumerate(fam.blocks, start=1):
            handles.append(block.register_forward_hook(snapshot(depth)))
        for module, depth in fam.taps:
            handles.append(module.register_forward_pre_hook(rebuild(depth)))
        try:
            with torch.no_grad():
                out = fam.model(x)
        finally:
            for h in handles:
                h.remove()
            if fam.positions is not None:
                for block in fam.blocks:
                    fam.positions(block, (), {}, None)
        return out, state["counts"]


def attention_branch_end(block):
    """The module whose output, added to the block's input, is h (test knowledge per family)."""
    for name in ("drop_path1", "layer_scale1"):  # timm (ViT, EVA, BEiT); HF DINOv2, DINOv3
        if hasattr(block, name):
            return getattr(block, name)
    if hasattr(block, "self_attention"):  # torchvision EncoderBlock
        return block.dropout
    if hasattr(block, "layernorm_before"):  # HF ViTLayer: its attention returns (out, weights)
        return block.attention
    return block.attn  # Segmenter and DPT blocks here: x + attn(norm1(x))


class _FirstKeys(torch.overrides.TorchFunctionMode):
    """Catches the keys of the first attention that runs: SDPA's key, or the right operand of
    the first matmul (q kᵀ), into state["keys"] as (tensor, transposed)."""

    _SDPA = (torch.nn.functional.scaled_dot_product_attention,)
    _MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm)

    def __init__(self, state):
        super().__init__()
        self.state = state

    def __enter__(self):  # torchvision's MultiheadAttention: its Python path, which calls SDPA
        self.fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.fastpath)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state["keys"] is None:
            if func in self._SDPA:
                self.state["keys"] = (kwargs.get("key", args[1] if len(args) > 1 else None),
                                      False)
            elif func in self._MATMUL:
                self.state["keys"] = (args[1], True)
            elif func is torch.nn.functional.multi_head_attention_forward:
                self.state["keys"] = (_torchvision_keys(*args[:7]), False)
        return func(*args, **kwargs)


def _torchvision_keys(query, key, value, embed_dim, heads, weight, bias):
    """The keys nn.MultiheadAttention computes (its calls inside are not seen by a mode):
    the middle third of its packed in-projection, (T, B, E) -> (B, H, T, E / H)."""
    E = embed_dim
    k = F.linear(key, weight[E:2 * E], bias[E:2 * E])
    T, B = k.shape[:2]
    return k.permute(1, 0, 2).reshape(B, T, heads, E // heads).transpose(1, 2)


def _first_of_each_group(total_map: torch.Tensor) -> torch.Tensor:
    """The leader of every merged token (its first original token), by a loop over the map."""
    first = {}
    for i, m in enumerate(total_map.tolist()):
        first.setdefault(m, i)
    return torch.tensor([first[m] for m in range(len(first))])


def hook_encoder_tokens(model, blocks, x, schedule, *, prefix):
    """Oracle for ``mpm_fx.fidelity.encoder_tokens``: the SPEC op applied with forward hooks
    before the scheduled ``blocks``, the last block's output rebuilt with the composed map;
    one image at a time. Returns (tokens (B, P + N0, D), [composed map per merge])."""
    tokens, maps = [], []
    for i in range(len(x)):
        state = {"map": None, "maps": [], "out": None}

        def merge_before(module, args):
            r = mpm_fx.merge(args[0], prefix=prefix)
            state["map"] = r.merge_map if state["map"] is None else mpm_fx.compose(state["map"],
                                                                                   r.merge_map)
            state["maps"].append(state["map"])
            return (r.tokens,) + args[1:]

        def keep(module, args, output):  # the rebuilt grid goes on to the decoder too
            state["out"] = (output if state["map"] is None
                            else mpm_fx.reconstruct(output, state["map"], prefix=prefix))
            return state["out"]

        handles = [blocks[k].register_forward_pre_hook(merge_before) for k in sorted(schedule)]
        handles.append(blocks[-1].register_forward_hook(keep))
        try:
            with torch.no_grad():
                model(x[i:i + 1])
        finally:
            for h in handles:
                h.remove()
        tokens.append(state["out"])
        maps.append(state["maps"])
    return torch.cat(tokens), [torch.cat(m) for m in zip(*maps)]


def tiny_segmenter(**kw):
    """A small random-init Segmenter in float64 (4 blocks, 64 px: 16 image tokens + CLS)."""
    torch.manual_seed(0)
    kw = {"n_cls": 3, "image_size": 64, "n_layers": 4, **kw}
    return segmenter.segmenter("tiny", **kw).double().eval()


def random_image(size=64, batch=1):
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size, dtype=torch.float64)
