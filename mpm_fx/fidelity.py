"""How close a merged model's output stays to the unmerged one's.

``compare(reference, merged)`` takes two segmentation outputs of shape (B, C, H, W):
- C == 1: probabilities (e.g. saliency); masks are ``p > threshold``;
- C > 1: class scores; the predicted class is the argmax over C.
It returns the mean absolute error of the raw outputs, the pixel agreement of the masks (or
classes) and their IoU (C == 1: of the foreground; C > 1: mean over the classes present in
either prediction), each averaged over the batch.

The multi-class view for models with one output channel: ``encoder_tokens`` returns the final
encoder tokens rebuilt to the full grid, plus the composed merge maps, from the rewritten
program; ``token_classes`` fits k-means on the unmerged tokens and ``class_miou`` compares the
class maps of unmerged and merged tokens.

A photo set at once: ``Judge(model, images)`` runs the unmerged model once (its outputs, and
k-means classes fitted on its final tokens of every image) and scores any setting against it,
every number the benchmarks and ``tune`` report, from one program run per image::

    judge = Judge(model, photos, classes=8)
    judge.score((2, 5))                          # MPM at (2, 5)
    judge.score((0, 2), method="forest", r=300)  # any method and options of mpm_fx.optimize
"""


from __future__ import annotations

import statistics

import torch
from torch import Tensor, nn

__all__ = ["compare", "score_images", "mean_scores", "kmeans", "token_classes", "class_miou",
           "encoder_tokens", "Judge", "METRICS"]

# what Judge.score gives, each a mean over the images ("mae": lower is better, the rest higher)
METRICS = ("pixel_agreement", "iou", "mae", "kmeans_miou")


def compare(reference: Tensor, merged: Tensor, *, threshold: float = 0.5) -> dict:
    if reference.shape != merged.shape or reference.dim() != 4:
        raise ValueError(f"compare needs two (B, C, H, W) outputs of one shape, got "
                         f"{tuple(reference.shape)} and {tuple(merged.shape)}")
    reference, merged = reference.detach().double(), merged.detach().double()
    mae = (reference - merged).abs().mean().item()
    if reference.shape[1] == 1:
        a, b = reference[:, 0] > threshold, merged[:, 0] > threshold
        union = (a | b).flatten(1).sum(1)
        iou = torch.where(union > 0, (a & b).flatten(1).sum(1) / union.clamp(min=1), 1.0)
    else:
        a, b = reference.argmax(1), merged.argmax(1)
        C = reference.shape[1]
        ious = []
        for image_a, image_b in zip(a, b):
            classes = torch.cat([image_a.flatten(), image_b.flatten()]).unique()
            per_class = [((image_a == c) & (image_b == c)).sum() / ((image_a == c) | (image_b == c)).sum()
                         for c in classes if 0 <= c < C]
            ious.append(torch.stack(per_class).mean())
        iou = torch.stack(ious)
    agreement = (a == b).flatten(1).double().mean(1)
    return {"mae": mae, "pixel_agreement": agreement.mean().item(), "iou": iou.mean().item()}


def score_images(references: list, optimized, images: list) -> list:
    """``compare`` of each image alone (batch 1) against its unmerged output, with the image
    tokens after each merge under "tokens": one dict per image. ``optimized`` is an
    ``mpm_fx.optimize`` result; ``references[i]`` the unmerged model's output on ``images[i]``."""
    scores = []
    with torch.inference_mode():
        for reference, image in zip(references, images):
            score = compare(reference, optimized(image))
            score["tokens"] = [c[0] for c in optimized.mpm_report().token_counts]
            scores.append(score)
    return scores


def mean_scores(scores: list) -> dict:
    """The mean over images of every number ``score_images`` gives (and of the token counts)."""
    mean = {k: statistics.mean(s[k] for s in scores) for k in ("mae", "pixel_agreement", "iou")}
    merges = len(scores[0]["tokens"])
    mean["tokens"] = [statistics.mean(s["tokens"][j] for s in scores) for j in range(merges)]
    return mean


def kmeans(points: Tensor, k: int, *, iters: int = 50, seed: int = 0) -> Tensor:
    """(k, D) centroids of (N, D) ``points``: k-means++ seeding from a fixed seed, then Lloyd
    steps until the assignment stops changing (at most ``iters``). Deterministic."""
    if points.dim() != 2 or len(points) < k or k < 1:
        raise ValueError(f"kmeans needs (N, D) points with N >= k >= 1, got "
                         f"{tuple(points.shape)} and k={k}")
    points = points.double()
    g = torch.Generator().manual_seed(seed)
    centroids = points[torch.randint(len(points), (1,), generator=g)]
    while len(centroids) < k:
        d2 = torch.cdist(points, centroids).min(1).values ** 2
        if d2.sum() == 0:  # fewer distinct points than k: repeat one
            nxt = torch.randint(len(points), (1,), generator=g)
        else:
            nxt = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        centroids = torch.cat([centroids, points[nxt]])
    labels = None
    for _ in range(iters):
        new = torch.cdist(points, centroids).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = points[labels == c]
            if len(members):
                centroids[c] = members.mean(0)
    return centroids


def token_classes(tokens: Tensor, centroids: Tensor) -> Tensor:
    """(..., D) tokens -> (...) index of the nearest centroid, on unit-normalised tokens (the
    cosine geometry MPM pairs tokens in)."""
    unit = torch.nn.functional.normalize(tokens.double(), dim=-1)
    return torch.cdist(unit.flatten(0, -2), centroids.double()).argmin(1).reshape(tokens.shape[:-1])


def class_miou(a: Tensor, b: Tensor) -> float:
    """Mean over images of the IoU of two (B, ...) class maps, averaged over the classes present
    in either map of that image."""
    scores = []
    for x, y in zip(a, b):
        classes = torch.cat([x.flatten(), y.flatten()]).unique()
        scores.append(statistics.mean(
            (((x == c) & (y == c)).sum() / ((x == c) | (y == c)).sum()).item() for c in classes))
    return statistics.mean(scores)


def encoder_tokens(model: nn.Module, x: Tensor, schedule=(), *, method="mpm", size_aware=None,
                   **options) -> tuple:
    """Final encoder tokens of ``model`` on ``x`` with merging at ``schedule`` (the merge
    ``method`` and its options, as ``mpm_fx.optimize`` takes them), from the rewritten program
    itself (option ``encoder_outputs`` of the pipeline), one image at a time.

    Returns ``(tokens, maps)``: tokens (B, P + N0, D), the last encoder block's output rebuilt to
    the full grid with the composed merge map; maps, one (B, N0) composed map per merge (the
    group of every original token after that merge).
    """
    from mpm_fx.methods import merging
    from mpm_fx.passes import rewrite
    from mpm_fx.schedule import normalize_schedule

    schedule = normalize_schedule(schedule)
    chosen = merging(method, schedule=schedule, size_aware=size_aware, **options)
    program, tokens, maps = None, [], []
    with torch.inference_mode():
        for i in range(len(x)):
            image = x[i:i + 1]
            if program is None:
                program = rewrite(model, (image,), {}, schedule, method=chosen,
                                  token_counts=False, encoder_outputs=True)
            _, extras = program.split(program.gm(image))
            tokens.append(extras["encoder_tokens"])
            maps.append([extras[f"map_{k}"] for k in schedule])
    return torch.cat(tokens), [torch.cat(m) for m in zip(*maps)]


class Judge:
    """Fidelity of merged settings of one model against the unmerged model over a set of
    images, each image alone (batch 1): pixel agreement, mask IoU, MAE (``compare``) and the
    k-means view (``classes`` clusters fitted on the unmerged final tokens of every image).

    images: (B, C, H, W) or a sequence of (1, C, H, W) tensors of one shape; names: one label
    per image for the per-image rows (default: their indices).
    """

    def __init__(self, model: nn.Module, images, *, classes: int = 8, names=None):
        self.model = model
        self.images = list(images.split(1)) if isinstance(images, Tensor) else list(images)
        self.names = list(names) if names is not None else list(range(len(self.images)))
        with torch.inference_mode():
            self.references = [model(x) for x in self.images]
        plain, _, self.prefix = self._run(())
        units = torch.nn.functional.normalize(plain[:, self.prefix:].flatten(0, 1).double(), dim=-1)
        self.centroids = kmeans(units, classes)
        self.classes = token_classes(plain[:, self.prefix:], self.centroids)

    def score(self, schedule=(), *, method="mpm", **options) -> dict:
        """The means over the images of ``METRICS`` and of the image tokens after each merge
        ("tokens"), and the per-image rows ("per_image": compare's numbers and the tokens)."""
        tokens, per_image, _ = self._run(schedule, method=method, **options)
        kmiou = class_miou(self.classes, token_classes(tokens[:, self.prefix:], self.centroids))
        return {**mean_scores(per_image), "kmeans_miou": kmiou, "per_image": per_image}

    def _run(self, schedule, *, method="mpm", **options) -> tuple:
        """(final encoder tokens of every image rebuilt to the full grid, per-image scores, the
        prefix tokens), from one rewritten program run once per image."""
        from mpm_fx.methods import merging
        from mpm_fx.passes import rewrite
        from mpm_fx.schedule import normalize_schedule

        schedule = normalize_schedule(schedule)
        chosen = merging(method, schedule=schedule, **options)
        program, tokens, per_image = None, [], []
        with torch.inference_mode():
            for name, x, reference in zip(self.names, self.images, self.references):
                if program is None:
                    program = rewrite(self.model, (x,), {}, schedule, method=chosen,
                                      token_counts=bool(schedule), encoder_outputs=True)
                output, extras = program.split(program.gm(x))
                tokens.append(extras["encoder_tokens"].cpu())
                counts = extras.get("token_counts")
                per_image.append({"image": name, **compare(reference, output),
                                  "tokens": [] if counts is None else counts[:, 0].tolist()})
        return torch.cat(tokens), per_image, program.context.analysis.prefix_tokens
