"""``mpm-bench eval-ade20k``: mIoU of an official Segmenter checkpoint on ADE20K val, without and
with MPM, single scale, as Segmenter evaluates it.

    mpm-bench eval-ade20k --data DIR --checkpoint FILE --schedule 2,5 [--limit N]

DIR holds ``ADEChallengeData2016/`` (or is it): ``images/validation/*.jpg`` and
``annotations/validation/*.png`` of the same names. FILE is a Segmenter checkpoint
(``checkpoint.pth``: ``{"model": state_dict, ...}``, ViT-T/S/B/L encoder, mask-transformer or
linear decoder) with its ``variant.yml`` beside it (read for the normalisation and the window;
without it the architecture is read off the state dict and the normalisation is "vit").

Pipeline, after Segmenter's ``segm/eval/miou.py`` and its mmseg config:
- image resized keeping its ratio to fit (2048, 512) (mmseg ``Resize``, bilinear), normalised;
- short side brought up to the window if smaller; windows of ``--window`` (variant crop size,
  512) every ``--stride`` (window - 32) pixels, the last flush with the border; window logits
  averaged where they overlap, resized to the original image, softmax, argmax;
- labels: 0 is "other" and ignored, class c is c - 1 (``reduce_zero_label``);
- mIoU: per-class intersection and union summed over the whole set, mean over classes seen.
The unmerged and merged models see the same windows, in batches of ``--window-batch``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import mpm_fx
from mpm_fx.bench.models import segmenter
from mpm_fx.bench.models.photos import IMAGENET_MEAN, IMAGENET_STD

from .common import header, print_header, write_json

NORMALIZATION = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                 "deit": (IMAGENET_MEAN, IMAGENET_STD)}
IGNORE = 255
MAX_SCALE = (2048, 512)  # mmseg Resize img_scale of Segmenter's ADE20K config (ratio 4)


def main(args) -> int:
    from tabulate import tabulate

    schedule = args.schedule  # parsed and checked by the command line
    pairs = dataset(args.data)[:args.limit]
    model, variant = load_checkpoint(args.checkpoint, args.variant, attention=args.attention,
                                     trust=args.trust_checkpoint)
    mean, std = NORMALIZATION[variant["normalization"]]
    window = args.window or variant["window"]
    stride = args.stride or window - 32
    if window != variant["image_size"]:
        raise SystemExit(f"mpm-bench: window {window} differs from the checkpoint's image size "
                         f"{variant['image_size']}; its position embeddings are for that size")
    info = header()
    print_header(info)
    print(f"# {args.checkpoint}: {variant['description']}, {len(pairs)} images, window {window} "
          f"stride {stride}, schedule {schedule}")
    merged = mpm_fx.optimize(model, schedule)
    runs = {"unmerged": model, "MPM": merged}
    n_cls = model.n_cls
    totals = {k: np.zeros((4, n_cls)) for k in runs}  # intersect, union, predicted, label
    seconds = dict.fromkeys(runs, 0.0)
    agree, pixels = 0, 0
    for image_path, label_path in tqdm(pairs, desc="ADE20K", unit="img"):
        image, label = read_pair(image_path, label_path)
        x = preprocess(image, mean, std)
        preds = {}
        for name, fn in runs.items():
            start = time.perf_counter()
            probs = sliding_window_probs(fn, x, label.shape, window, stride, n_cls,
                                         args.window_batch)
            seconds[name] += time.perf_counter() - start
            preds[name] = probs.argmax(0)
            totals[name] += areas(preds[name], label, n_cls)
        agree += int((preds["unmerged"] == preds["MPM"]).sum())
        pixels += preds["MPM"].numel()
    scores = {name: metrics(t) for name, t in totals.items()}
    for name in runs:
        scores[name]["seconds_per_image"] = seconds[name] / max(1, len(pairs))
    print(tabulate([[name, f"{100 * s['miou']:.2f}", f"{100 * s['pixel_accuracy']:.2f}",
                     f"{s['seconds_per_image']:.2f}"] for name, s in scores.items()],
                   headers=["", "mIoU %", "pixel acc %", "s / image"]))
    print(f"prediction agreement MPM vs unmerged: {agree / max(1, pixels):.4f}")
    write_json(args.json, {"header": info, "checkpoint": str(args.checkpoint), "variant": variant,
                           "images": len(pairs), "window": window, "stride": stride,
                           "schedule": list(schedule), "scores": scores,
                           "prediction_agreement": agree / max(1, pixels)})
    return 0


def dataset(root: Path) -> list:
    """Sorted (image, annotation) paths of ADE20K's validation split under ``root``."""
    root = Path(root)
    for base in (root, root / "ADEChallengeData2016"):
        images, labels = base / "images" / "validation", base / "annotations" / "validation"
        if images.is_dir() and labels.is_dir():
            break
    else:
        raise SystemExit(f"mpm-bench: no ADE20K validation split under {root}: expected "
                         "ADEChallengeData2016/images/validation/*.jpg and "
                         "ADEChallengeData2016/annotations/validation/*.png (the folder of "
                         "ADEChallengeData2016.zip, or that folder itself)")
    pairs, missing = [], []
    for image in sorted(images.glob("*.jpg")):
        label = labels / f"{image.stem}.png"
        (pairs if label.is_file() else missing).append((image, label))
    if missing or not pairs:
        raise SystemExit(f"mpm-bench: {len(pairs)} images with annotations under {images}; "
                         f"{len(missing)} without (first: {missing[0][1] if missing else '-'})")
    return pairs


def read_pair(image_path: Path, label_path: Path) -> tuple:
    """(H, W, 3) uint8 RGB and (H, W) int64 labels, 0 -> ignored, c -> c - 1."""
    from PIL import Image

    image = np.asarray(Image.open(image_path).convert("RGB"))
    label = torch.from_numpy(np.asarray(Image.open(label_path), dtype=np.int64).copy())
    if label.shape != image.shape[:2]:
        raise SystemExit(f"mpm-bench: {label_path} is {tuple(label.shape)}, its image "
                         f"{image.shape[:2]}")
    label = torch.where(label == 0, IGNORE, label - 1)
    return image, label


def preprocess(image: np.ndarray, mean, std) -> torch.Tensor:
    """mmseg ``Resize(img_scale=(2048, 512), keep_ratio=True)`` then ``Normalize``: (1, 3, h, w)."""
    h, w = image.shape[:2]
    scale = min(max(MAX_SCALE) / max(h, w), min(MAX_SCALE) / min(h, w))
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x = x / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def window_anchors(length: int, window: int, stride: int) -> list:
    """Window starts along one side: every ``stride`` while a window fits, then one flush with
    the end (Segmenter's ``sliding_window``)."""
    return [a for a in range(0, length, stride) if a < length - window] + [length - window]


def sliding_window_probs(model, x: torch.Tensor, out_shape, window: int, stride: int,
                         n_cls: int, batch: int) -> torch.Tensor:
    """(C, H, W) class probabilities at ``out_shape`` from windows of the (1, 3, h, w) image."""
    h, w = x.shape[2:]
    if min(h, w) < window:  # Segmenter's resize(im, window): short side up to the window
        ratio = max(h, w) / min(h, w)
        size = (window, int(ratio * window)) if h < w else (int(ratio * window), window)
        x = F.interpolate(x, size=size, mode="bilinear")
        h, w = size
    anchors = [(a, b) for a in window_anchors(h, window, stride)
               for b in window_anchors(w, window, stride)]
    crops = torch.cat([x[:, :, a:a + window, b:b + window] for a, b in anchors])
    logits = torch.zeros(n_cls, h, w)
    count = torch.zeros(1, h, w)
    with torch.inference_mode():
        for i in range(0, len(crops), batch):
            out = model(crops[i:i + batch])
            for (a, b), o in zip(anchors[i:i + batch], out):
                logits[:, a:a + window, b:b + window] += o
                count[:, a:a + window, b:b + window] += 1
    logits = F.interpolate((logits / count)[None], size=tuple(out_shape), mode="bilinear")[0]
    return logits.softmax(0)


def areas(pred: torch.Tensor, label: torch.Tensor, n_cls: int) -> np.ndarray:
    """(4, C): intersection, union, predicted and labelled pixels per class (ignored pixels
    left out), as mmseg's ``intersect_and_union``."""
    keep = label != IGNORE
    pred, label = pred[keep], label[keep]
    inter = torch.bincount(pred[pred == label], minlength=n_cls)[:n_cls]
    area_pred = torch.bincount(pred, minlength=n_cls)[:n_cls]
    area_label = torch.bincount(label, minlength=n_cls)[:n_cls]
    return np.stack([inter, area_pred + area_label - inter, area_pred, area_label]).astype(float)


def metrics(total: np.ndarray) -> dict:
    inter, union, _, label = total
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    seen = ~np.isnan(iou)
    return {"miou": float(iou[seen].mean()) if seen.any() else math.nan,
            "pixel_accuracy": float(inter.sum() / max(1.0, label.sum())),
            "classes_seen": int(seen.sum())}


def load_checkpoint(path: Path, variant_path: Path | None = None, *, attention: str = "sdpa",
                    trust: bool = False) -> tuple:
    """Our Segmenter with the weights of an official checkpoint, and what its variant says:
    {"normalization", "window", "image_size", "description"}."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"mpm-bench: no checkpoint at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 (unpickling errors come in many types)
        raise SystemExit(f"mpm-bench: cannot read {path} as a weights-only checkpoint ({e}); "
                         "if you trust the file, pass --trust-checkpoint") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or "encoder.cls_token" not in state:
        raise SystemExit(f"mpm-bench: {path} is not a Segmenter checkpoint: expected a dict "
                         "with 'model' holding encoder.* and decoder.* weights")
    variant_path = Path(variant_path) if variant_path else path.parent / "variant.yml"
    variant = {}
    if variant_path.is_file():
        import yaml

        variant = yaml.safe_load(variant_path.read_text()) or {}
    model, description = build(state, attention)
    classifier = [k for k in state if k.startswith(("encoder.head.", "encoder.head_dist."))]
    state = {k: v for k, v in state.items() if k not in classifier}  # ImageNet head: unused
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise SystemExit(f"mpm-bench: {path} does not fit {description}: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    data_kwargs = variant.get("dataset_kwargs", {})
    image_size = model.encoder.image_size
    return model.eval(), {"normalization": data_kwargs.get("normalization", "vit"),
                          "window": int(data_kwargs.get("crop_size", image_size)),
                          "image_size": image_size, "description": description}


def build(state: dict, attention: str) -> tuple:
    """A Segmenter shaped like the state dict (Segmenter's factory: heads = d / 64, MLP 4 d)."""
    d = state["encoder.cls_token"].shape[-1]
    patch = state["encoder.patch_embed.proj.weight"].shape[-1]
    distilled = "encoder.dist_token" in state
    layers = _count(state, "encoder.blocks.")
    grid = state["encoder.pos_embed"].shape[1] - 1 - distilled
    side = math.isqrt(grid)
    if side * side != grid:
        raise SystemExit(f"mpm-bench: position embeddings for {grid} patches are not a square "
                         "grid; only square training crops are supported")
    encoder = segmenter.VisionTransformer((side * patch, side * patch), patch, layers, d, d // 64,
                                          4 * d, distilled=distilled, attention=attention)
    encoder.image_size = side * patch
    if "decoder.cls_emb" in state:
        n_cls = state["decoder.cls_emb"].shape[1]
        dec_layers = _count(state, "decoder.blocks.")
        decoder: nn.Module = segmenter.MaskTransformer(n_cls, patch, d, dec_layers, d // 64, d,
                                                       4 * d, attention)
        kind = f"mask transformer ({dec_layers} layers)"
    elif "decoder.head.weight" in state:
        n_cls = state["decoder.head.weight"].shape[0]
        decoder, kind = segmenter.DecoderLinear(n_cls, patch, d), "linear decoder"
    else:
        raise SystemExit("mpm-bench: the checkpoint has neither decoder.cls_emb (mask "
                         "transformer) nor decoder.head.weight (linear decoder)")
    name = {192: "ViT-T", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L"}.get(d, f"ViT d={d}")
    return (segmenter.Segmenter(encoder, decoder, n_cls),
            f"Segmenter {name}/{patch}, {layers} blocks, {kind}, {n_cls} classes, "
            f"{side * patch} px")


def _count(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
