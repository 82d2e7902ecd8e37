"""Real photos that ship inside installable wheels (no download), as normalised (1, 3, S, S)
tensors: the repository's set ``NAMES`` (scikit-image, scikit-learn and matplotlib sample
images), and ``HELD_OUT``, 16 photos no method was tuned on, from other wheels installed
without their dependencies (only their image files are read, nothing is imported)::

    pip install --no-deps ultralytics==8.4.190 insightface==2.1 mahotas==1.4.19
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NAMES", "HELD_OUT", "HELD_OUT_INSTALL", "IMAGENET_MEAN", "IMAGENET_STD", "photo",
           "photos", "photo_set"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation ImageNet-trained ViTs expect
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> loader returning an (H, W, 3) or (H, W) uint8 array
NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera", "coins",
         "hubble", "immunohistochemistry", "retina", "china", "flower", "grace_hopper",
         "brick", "grass", "gravel", "moon")


# name -> (package, path inside it, which square: "centre", "left" or "right")
_HELD_OUT = {
    "bus": ("ultralytics", "assets/bus.jpg", "centre"),
    "zidane_left": ("ultralytics", "assets/zidane.jpg", "left"),
    "zidane_right": ("ultralytics", "assets/zidane.jpg", "right"),
    "friends_left": ("insightface", "data/images/t1.jpg", "left"),
    "friends_right": ("insightface", "data/images/t1.jpg", "right"),
    "portrait": ("mahotas", "demos/data/luispedro.jpg", "centre"),
    "tom_hanks": ("insightface", "data/images/Tom_Hanks_54745.png", "centre"),
    "nuclei": ("mahotas", "demos/data/nuclear.png", "centre"),
    "department_store": ("mahotas", "demos/data/DepartmentStore.jpg", "centre"),
    "mask_blue": ("insightface", "data/images/mask_blue.jpg", "centre"),
    "mask_white": ("insightface", "data/images/mask_white.jpg", "centre"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png", "centre"),
    "clock_motion": ("skimage", "data/clock_motion.png", "centre"),
    "cell": ("skimage", "data/cell.png", "centre"),
    "text": ("skimage", "data/text.png", "centre"),
    "microaneurysms": ("skimage", "data/microaneurysms.png", "centre"),
}
HELD_OUT = tuple(_HELD_OUT)
HELD_OUT_INSTALL = "pip install --no-deps ultralytics==8.4.190 insightface==2.1 mahotas==1.4.19"


def _held_out_array(name: str) -> np.ndarray:
    import importlib.util
    from pathlib import Path

    package, path, _ = _HELD_OUT[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"the held-out photo {name!r} comes from the {package} wheel: "
                                  f"{HELD_OUT_INSTALL} (only its image files are read)")
    from skimage import io

    return io.imread(Path(spec.submodule_search_locations[0]) / path)


def _array(name: str) -> np.ndarray:
    if name in _HELD_OUT:
        return _held_out_array(name)
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


def photo(name: str, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
          dtype=torch.float32) -> torch.Tensor:
    """One photo, centre-cropped to a square (``size`` a side) or to the aspect of ``size``
    = (height, width), resized and normalised: (1, 3, H, W)."""
    if name not in NAMES and name not in _HELD_OUT:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(NAMES + HELD_OUT)}")
    a = np.asarray(_array(name))
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = (a * 255).clip(0, 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    H, W = a.shape[:2]
    h, w = (H, round(H * out_w / out_h)) if W * out_h >= H * out_w else (round(W * out_h / out_w), W)
    left = {"left": 0, "right": W - w}.get(_HELD_OUT.get(name, ("", "", ""))[2], (W - w) // 2)
    a = a[(H - h) // 2:(H - h) // 2 + h, left:left + w]
    x = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)[None].double() / 255
    x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
                      align_corners=False)
    x = (x - torch.tensor(mean, dtype=x.dtype)[:, None, None]) / torch.tensor(
        std, dtype=x.dtype)[:, None, None]
    return x.to(dtype)


def photos(names=NAMES[:3], size: int = 224, **kw) -> torch.Tensor:
    """Several photos as one batch: (len(names), 3, S, S)."""
    return torch.cat([photo(n, size, **kw) for n in names])


def photo_set(which: str) -> tuple:
    """The names of a set: "repository" (``NAMES``), its two halves "search" (even indices:
    the only photos choices are made on) and "check" (odd indices), or "held-out"
    (``HELD_OUT``, photos from other wheels)."""
    sets = {"repository": NAMES, "search": NAMES[0::2], "check": NAMES[1::2],
            "held-out": HELD_OUT}
    if which not in sets:
        raise ValueError(f"unknown photo set {which!r}; choose from {', '.join(sets)}")
    return sets[which]
