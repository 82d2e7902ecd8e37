"""Real photos for the library's tests, loaded here (not from mpm_fx.bench): sample images that
ship inside installed wheels (scikit-image, scikit-learn, matplotlib), centre-cropped square,
resized and ImageNet-normalised, as (B, 3, S, S) tensors. Random-init models merge real photos
unlike noise (fewer near-duplicate tokens), which is what most tests want."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

__all__ = ["NAMES", "photos", "needs_held_out"]

NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera", "coins", "hubble",
         "immunohistochemistry", "retina", "china", "flower", "grace_hopper", "brick", "grass",
         "gravel", "moon")
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# mpm-bench's held-out photo set comes from three wheels installed without their dependencies
needs_held_out = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("ultralytics", "insightface", "mahotas")),
    reason="the held-out photos: pip install --no-deps ultralytics==8.4.190 insightface==2.1 "
           "mahotas==1.4.19 (the README's test command installs them)")


def _pixels(name: str) -> np.ndarray:
    from skimage import data

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        import matplotlib.cbook as cbook
        import matplotlib.image as mpimg

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return mpimg.imread(f, format="jpg")
    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return data.hubble_deep_field() if name == "hubble" else getattr(data, name)()


def photos(names=NAMES[:3], size: int = 224, dtype=torch.float32) -> torch.Tensor:
    """(len(names), 3, size, size) photos, normalised as ImageNet-trained ViTs expect."""
    batch = []
    for name in names:
        a = np.asarray(_pixels(name))
        a = np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]
        if a.dtype != np.uint8:
            a = (a * 255).clip(0, 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
        side = min(a.shape[:2])
        top, left = (a.shape[0] - side) // 2, (a.shape[1] - side) // 2
        x = torch.from_numpy(np.array(a[top:top + side, left:left + side], copy=True))
        x = x.permute(2, 0, 1)[None].double() / 255
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (_MEAN, _STD))
        batch.append((x - mean) / std)
    return torch.cat(batch).to(dtype)
