"""Real photos that ship inside installable wheels (no download): scikit-image, scikit-learn and
matplotlib sample images, as normalised (1, 3, S, S) tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NAMES", "IMAGENET_MEAN", "IMAGENET_STD", "photo", "photos"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation ImageNet-trained ViTs expect
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> loader returning an (H, W, 3) or (H, W) uint8 array
NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera", "coins",
         "hubble", "immunohistochemistry", "retina", "china", "flower", "grace_hopper",
         "brick", "grass", "gravel", "moon")


def _array(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        import matplotlib.cbook as cbook
        import matplotlib.image as mpimg
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return mpimg.imread(f, format="jpg")
    from skimage import data
    loaders = {"motorcycle": lambda: data.stereo_motorcycle()[0],
               "hubble": data.hubble_deep_field}
    return (loaders.get(name) or getattr(data, name))()


def photo(name: str, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
          dtype=torch.float32) -> torch.Tensor:
    """One photo, centre-cropped to a square, resized to ``size`` and normalised: (1, 3, S, S)."""
    if name not in NAMES:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(NAMES)}")
    a = np.asarray(_array(name))
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = (a * 255).clip(0, 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
    H, W = a.shape[:2]
    s = min(H, W)
    a = a[(H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    x = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)[None].double() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean, dtype=x.dtype)[:, None, None]) / torch.tensor(
        std, dtype=x.dtype)[:, None, None]
    return x.to(dtype)


def photos(names=NAMES[:3], size: int = 224, **kw) -> torch.Tensor:
    """Several photos as one batch: (len(names), 3, S, S)."""
    return torch.cat([photo(n, size, **kw) for n in names])
