"""Cost of one MPM call against one transformer block, eager and Inductor-compiled.

    python -m bench.op_cost [--repeats 50] [--no-compile] [--memory] [--against OPS.py]

Blocks are timm ViT-T/S/B blocks (D = 192/384/768) at N = 1024 image tokens + 1 class token, the
size of a 512-px ViT/16 or 448-px ViT/14. Cost of both ops depends on N and D, not on values, so
random weights and tokens are used here. Merge and block are timed interleaved in one process
(median of --repeats rounds). --memory adds the peak live tensor memory of one merge at
N = 16,384, from the allocator events of torch.profiler. --against times another version of
the op beside this one, in the same rounds (e.g. ``git show REV:mpm_fx/ops.py > /tmp/ops_rev.py``),
and checks that both give the same merge map and tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import timm
import torch
from tabulate import tabulate

import mpm_fx
from mpm_fx.bench.memory import peak_tensor_bytes

from .common import interleaved, median_ms, start_script, write_json

# torch's own deprecation notice from inside Inductor's lowering, not ours

MODELS = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224"}


def op_cost(repeats: int, compile_: bool, against=None) -> list[dict]:
    """Per width and mode: one block, one merge, and (``against``: another ops module) its merge,
    timed in the same interleaved rounds."""
    rows = []
    for d, name in MODELS.items():
        block = timm.create_model(name, pretrained=False).blocks[0].eval()
        x = torch.randn(1, 1 + 1024, d)
        ops = {"merge": mpm_fx.merge} | ({"against": against.merge} if against else {})
        modes = {"eager": (block, {k: _merging(op) for k, op in ops.items()})}
        if compile_:
            modes["inductor"] = (torch.compile(block, fullgraph=True),
                                 {k: torch.compile(_merging(op), fullgraph=True) for k, op in ops.items()})
        with torch.inference_mode():
            for mode, (run_block, merges) in modes.items():
                runs = {"block": lambda: run_block(x)} | {k: (lambda f=f: f(x)) for k, f in merges.items()}
                times = interleaved(runs, repeats)
                b, m = median_ms(times["block"]), median_ms(times["merge"])
                row = {"D": d, "mode": mode, "block_ms": round(b, 3), "merge_ms": round(m, 3),
                       "merge_share_of_block": round(m / b, 3)}
                if against:
                    a = median_ms(times["against"])
                    ours, theirs = merges["merge"](x), merges["against"](x)
                    row |= {"against_ms": round(a, 3), "merge_over_against": round(m / a, 3),
                            "same_result": bool(torch.equal(ours.merge_map, theirs.merge_map)
                                                and torch.equal(ours.tokens, theirs.tokens))}
                rows.append(row)
    return rows


def _merging(op):
    return lambda t: op(t, prefix=1)


def load_ops(path: Path):
    """An ops module from a file (another version of mpm_fx/ops.py), for --against."""
    spec = importlib.util.spec_from_file_location("mpm_fx_ops_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_memory(n: int, dims=(192, 384, 768, 1024)) -> list[dict]:
    """Peak live tensor memory of one eager merge of n tokens (mpm_fx.bench.memory, allocator events)."""
    rows = []
    for d in dims:
        x = torch.randn(1, n, d)
        peak, r = peak_tensor_bytes(lambda: mpm_fx.merge(x))
        output = r.tokens.numel() * r.tokens.element_size() + r.merge_map.numel() * 8
        rows.append({"N": n, "D": d, "M": r.tokens.shape[1], "peak_MiB": round(peak / 2**20, 1),
                     "of_which_output_MiB": round(output / 2**20, 1),
                     "whole_similarity_would_be_MiB": n * n * 4 // 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--memory", action="store_true", help="also peak memory at N = 16,384")
    parser.add_argument("--against", type=Path, default=None,
                        help="another version of mpm_fx/ops.py to time beside this one")
    parser.add_argument("--json", type=Path, default=None, help="write results here too")
    args = parser.parse_args()

    info = start_script()
    against = load_ops(args.against) if args.against else None
    rows = op_cost(args.repeats, not args.no_compile, against)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    result = {"header": info, "op_cost": rows}
    if against:
        result["against"] = str(args.against)
    if args.memory:
        memory = peak_memory(16384)
        print(tabulate(memory, headers="keys", tablefmt="github"))
        result["memory"] = memory
    write_json(args.json, result)


if __name__ == "__main__":
    main()
