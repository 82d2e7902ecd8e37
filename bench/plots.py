"""The pictures of ``mpm-bench run``: the masks unmerged and merged, the speed/fidelity Pareto
plot over schedules, and the merge map of one photo."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402


def pareto_png(models: list, path: Path) -> None:
    """Speed-up (x) against pixel agreement (y), one point per schedule and backend (smallest
    batch) with its p10-p90 range as an error bar and the bound its token counts allow as a
    cross, the Pareto front of each series drawn as a line, schedules written next to points;
    every compared merge method (``--compare``) as its own dashed curve of hollow markers."""
    models = [m for m in models if m["timings"]]
    if not models:
        return
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    labelled, bound_labelled = set(), False  # each schedule named once
    for m in models:
        batch = min(t["batch"] for t in m["timings"])
        for backend in dict.fromkeys(t["backend"] for t in m["timings"]):
            rows = [t for t in m["timings"] if t["backend"] == backend and t["batch"] == batch]
            base = next(t for t in rows if not t["schedule"])
            merged = [t for t in rows if t["schedule"] and not t.get("method")]
            pts = sorted([(1.0, 1.0, "unmerged")] + [
                (t["speedup"], m["fidelity"][str(tuple(t["schedule"]))]["pixel_agreement"],
                 tuple(t["schedule"])) for t in merged])
            label = f"MPM, {m['model']} {m['size']}px, {backend}, batch {batch}"
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=label)[0]
            colour = line.get_color()
            for t in merged:  # the speed-up over the unmerged median, at merged p90 and p10
                y = m["fidelity"][str(tuple(t["schedule"]))]["pixel_agreement"]
                low, high = base["median_ms"] / t["p90_ms"], base["median_ms"] / t["p10_ms"]
                ax.errorbar([t["speedup"]], [y], xerr=[[t["speedup"] - low], [high - t["speedup"]]],
                            fmt="none", ecolor=colour, alpha=0.5, capsize=2)
                if t.get("bound") is not None:
                    ax.plot([t["bound"]], [y], "x", color=colour, alpha=0.8,
                            label=None if bound_labelled else "bound the token counts allow")
                    bound_labelled = True
            front = _front(pts)
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color=colour, alpha=0.6)
            markers = iter("sD^v<>")
            for label in dict.fromkeys(t["method"] for t in rows if t.get("method")):
                at = sorted((t["speedup"], m["fidelity"][str(tuple(t["schedule"]))]["methods"][
                    label]["pixel_agreement"]) for t in rows if t.get("method") == label)
                ax.plot([a[0] for a in at], [a[1] for a in at], next(markers, "o") + "--",
                        mfc="none", color=colour, alpha=0.8,
                        label=f"{label} at the same token counts, {backend}")
            for s, a, schedule in pts:
                if (m["model"], m["size"], schedule) not in labelled:
                    labelled.add((m["model"], m["size"], schedule))
                    ax.annotate(_short(schedule), (s, a), fontsize=7, xytext=(-4, -10),
                                textcoords="offset points", ha="right")
    ax.set_xlabel("speed-up over the unmerged model (same backend, interleaved medians; "
                  "bars: p10-p90)", fontsize=8)
    ax.set_ylabel("pixel agreement with the unmerged model")
    ax.set_title("Schedules: speed against fidelity" + (" (hollow: other merge methods at MPM's "
                                                        "token counts)" if any(
        t.get("method") for m in models for t in m["timings"]) else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def masks_png(masks: dict, path: Path) -> None:
    """One row per photo: the photo, the unmerged mask, the merged mask and where they differ,
    with the photo's pixel agreement in the title. One output channel: the mask at 0.5;
    several: the argmax class."""
    from mpm_fx.bench.models.photos import IMAGENET_MEAN, IMAGENET_STD

    n = len(masks["photos"])
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), dpi=100, squeeze=False)
    schedule = tuple(masks["schedule"])
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for row, name in enumerate(masks["photos"]):
        photo = masks["images"][row].permute(1, 2, 0).float().numpy() * std + mean
        plain, merged = (_mask(masks[k][row]) for k in ("unmerged", "merged"))
        differ = plain != merged
        titles = [name, "unmerged", f"merged {schedule}",
                  f"differ: {differ.mean():.1%} (agreement {masks['agreement'][row]:.3f})"]
        for ax, image, title in zip(axes[row], (photo.clip(0, 1), plain, merged, differ), titles):
            cmap = None if image.ndim == 3 else "magma" if image is differ else "viridis"
            ax.imshow(image, cmap=cmap, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _mask(output) -> np.ndarray:
    """(1, C, H, W) output -> (H, W): foreground at 0.5 (C == 1) or the argmax class."""
    out = output[0].detach().float().numpy()
    return out[0] > 0.5 if out.shape[0] == 1 else out.argmax(0)


def _short(schedule) -> str:
    """(0, 1, 2, 3, 5) -> "(0-3, 5)"."""
    if not isinstance(schedule, tuple):
        return str(schedule)
    runs, parts = [], []
    for k in schedule:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    for a, b in runs:
        parts.append(str(a) if a == b else f"{a}, {b}" if b == a + 1 else f"{a}-{b}")
    return f"({', '.join(parts)})"


def _front(points: list) -> list:
    """Points not beaten on both speed-up and agreement, by speed-up."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in points)]
    return sorted(front)


def merge_map_png(model: dict, path: Path) -> None:
    """The photo, then after each merge: every group of two or more patches filled with one
    colour, borders drawn between patches of different groups."""
    from mpm_fx.bench.models.photos import IMAGENET_MEAN, IMAGENET_STD, photo

    info = model["merge_map"]
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    x = photo(info["photo"], model["size"])[0].permute(1, 2, 0).numpy()  # as the model saw it
    image = ((x * std + mean).clip(0, 1) * 255).round().astype(np.uint8)
    g, maps = info["grid"], [np.asarray(m).reshape(info["grid"], info["grid"])
                             for m in info["maps"]]
    S = image.shape[0]
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(4 * (len(maps) + 1), 4.3), dpi=100)
    axes[0].imshow(image)
    axes[0].set_title(f"{info['photo']}, {g} x {g} patches", fontsize=9)
    for k, (ax, groups) in enumerate(zip(axes[1:], maps)):
        ax.imshow(image)
        sizes = np.bincount(groups.ravel())
        rng = np.random.default_rng(0)
        colours = rng.uniform(0.15, 1.0, size=(len(sizes), 3))
        overlay = np.zeros((g, g, 4))
        merged = sizes[groups] >= 2
        overlay[..., :3] = colours[groups]
        overlay[..., 3] = np.where(merged, 0.45, 0.0)
        ax.imshow(overlay, extent=(0, S, S, 0), interpolation="nearest")
        step, segments = S / g, []
        for i, j in zip(*np.nonzero(groups[:, :-1] != groups[:, 1:])):  # vertical borders
            segments.append([((j + 1) * step, i * step), ((j + 1) * step, (i + 1) * step)])
        for i, j in zip(*np.nonzero(groups[:-1] != groups[1:])):  # horizontal borders
            segments.append([(j * step, (i + 1) * step), ((j + 1) * step, (i + 1) * step)])
        ax.add_collection(LineCollection(segments, colors="white", linewidths=0.4))
        schedule = tuple(info["schedule"])
        ax.set_title(f"after merge {k + 1} of {schedule}: {len(np.unique(groups))} tokens",
                     fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.text(0.5, 0.01, "Each coloured cell is a patch merged with others; cells of one colour "
             "(inside white borders) are one token. Uncoloured patches are unmerged.",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path)
    plt.close(fig)


def frontier_png(result: dict, path: Path) -> None:
    """Pixel agreement (y) against the measured speed-up (x): one panel per backend (columns)
    and photo set checked (rows); each method's candidates as faint dots, its front (chosen on
    the search photos) as a line with the p10-p90 speed-up spread as error bars."""
    backends = list(result["timing"])
    sets = [n for n in result["photo_sets"] if n != "search"]
    if not backends or not sets:
        return
    fig, axes = plt.subplots(len(sets), len(backends), figsize=(6 * len(backends),
                                                              4.5 * len(sets)),
                             dpi=110, squeeze=False)
    colours = dict(zip(["mpm", "tome", "forest", "local"], plt.cm.tab10.colors))
    for col, backend in enumerate(backends):
        timing, fronts = result["timing"][backend], result["fronts"][backend]
        for row, name in enumerate(sets):
            ax = axes[row][col]
            for method, keys in fronts.items():
                colour = colours.get(method)
                pts = sorted((timing[k]["speedup"], result["settings"][k]["scores"][name][
                    "pixel_agreement"], timing[k]["speedup_p10"], timing[k]["speedup_p90"])
                    for k in keys)
                others = [(timing[k]["speedup"], v["scores"][name]["pixel_agreement"])
                          for k, v in result["settings"].items()
                          if v["method"] == method and k in timing and k not in keys]
                ax.plot([o[0] for o in others], [o[1] for o in others], ".", color=colour,
                        alpha=0.25)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            xerr=[[p[0] - p[2] for p in pts], [p[3] - p[0] for p in pts]],
                            fmt="o-", color=colour, capsize=2, label=method)
            for point in result["points"]:
                ax.axvline(point, color="grey", lw=0.5, alpha=0.3)
            ax.set_xlabel(f"speed-up over unmerged, {backend} (measured, p10-p90)")
            ax.set_ylabel(f"pixel agreement, {name} photos")
            ax.set_ylim(max(0.85, ax.get_ylim()[0]), 1.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{result['model']} {result['size']} px: each method's front, chosen on the "
                 "search photos", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
