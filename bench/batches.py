"""Batches: one padded batch against each image run alone, on the real model, eager.

    python -m mpm_fx.bench.batches [--batch 1,4,8] [--schedule 2,5] [--repeats 10] [--json PATH]

Images of a batch merge to different counts; the merged batch is padded to the largest and
later attentions mask the padding. The alternative is to give up batching after the merge and
run each image on its own count. This times, in the same interleaved rounds: the unmerged model
on the batch and on each image alone (what batching itself is worth on this machine), and the
merged model padded and on each image alone, as images per second.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tabulate import tabulate

import mpm_fx
from mpm_fx.bench.models import focus
from mpm_fx.bench.models.photos import NAMES, photos

from .common import interleaved, start_script, write_json


def measure(model, x, batches, schedule, repeats) -> list:
    rows = []
    with torch.inference_mode():
        for B in batches:
            xb = x[[i % len(x) for i in range(B)]].contiguous()
            alone = [xb[i:i + 1] for i in range(B)]
            padded = mpm_fx.optimize(model, schedule, example_inputs=xb)
            single = mpm_fx.optimize(model, schedule, example_inputs=alone[0])
            padded(xb)
            counts = padded.mpm_report().token_counts  # per merge, per image
            runs = {"unmerged batch": lambda: model(xb),
                    "unmerged alone": lambda: [model(a) for a in alone],
                    "merged padded": lambda: padded(xb),
                    "merged alone": lambda: [single(a) for a in alone]}
            times = interleaved(runs, repeats)
            rows.append({"batch": B, "schedule": list(schedule),
                         **{k: round(B * 1e3 / statistics.median(v), 3) for k, v in times.items()},
                         "padding_share": round(
                             sum(max(c) * len(c) - sum(c) for c in counts)
                             / sum(max(c) * len(c) for c in counts), 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,4,8", help="comma-separated batch sizes")
    parser.add_argument("--schedule", default="2,5", help="the MPM schedule")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write results here too")
    args = parser.parse_args()
    info = start_script()
    model = focus.load(args.size)
    x = photos(NAMES[:8], args.size)
    batches = [int(b) for b in args.batch.split(",")]
    schedule = tuple(int(k) for k in args.schedule.split(","))
    rows = measure(model, x, batches, schedule, args.repeats)
    print("images per second (higher is better):")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    write_json(args.json, {"header": info, "what": "images/s, eager, interleaved medians",
                           "size": args.size, "repeats": args.repeats, "batches": rows})


if __name__ == "__main__":
    main()
