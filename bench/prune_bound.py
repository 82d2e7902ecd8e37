"""Could global MPM skip parts of its N x N similarity exactly? A measurement on the real
DINOv2-S/14 (docs/benchmarks.md, "High resolution"):

    python -m mpm_fx.bench.prune_bound [--size 896] [--photos 4] [--tiles 4,8,16]
        [--json bench/results/prune_bound.json]

The idea (the high-resolution issue): cut the patch grid into square tiles; for every tile T
keep the mean c_T of its unit rows and the radius r_T = max |u_j - c_T| over j in T. Then for
any row i, ``u_i . u_j <= u_i . c_T + r_T`` for every j in T (Cauchy-Schwarz), so a tile whose
bound is below a score row i already has (its best within its own tile and the 8 around it,
computed first) cannot hold row i's maximum and need not be computed, and the answer stays
exact. What it saves is bounded by the fraction of (row, tile) pairs whose bound is below that
score; a blocked implementation (one GEMM per pair of tiles) saves only (tile, tile) blocks that
every row of the first tile can skip. Both fractions, on the real tokens at the input of the
blocks MPM merges before (0, 2, 5, 8, 11), with the neighbourhood's own cost counted as
computed. Then the best case of a blocked implementation, timed: the dense similarity of the
real tokens (one GEMM, what global MPM's strips compute) against only the kept (tile, tile)
blocks as one batched GEMM of gathered tiles (the bound's own cost and the bookkeeping left
out), interleaved, eager, the skipped fraction set to the measured mean.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from mpm_fx.bench.models import focus
from mpm_fx.bench.models.photos import NAMES, photos

from .common import interleaved, median_ms, start_script, write_json

BLOCKS = (0, 2, 5, 8, 11)


def skippable(u: torch.Tensor, side: int, tile: int) -> dict:
    """Fractions of (row, tile) pairs and of (tile, tile) blocks the bound skips, for unit rows
    ``u`` (N, D) of a ``side`` x ``side`` grid, tiles of ``tile`` x ``tile`` patches."""
    N = u.shape[0]
    S = u @ u.T
    S.fill_diagonal_(-2)
    r, c = torch.arange(N) // side, torch.arange(N) % side
    per_row = (side + tile - 1) // tile
    tid = (r // tile) * per_row + c // tile
    T = int(tid.max()) + 1
    count = torch.bincount(tid, minlength=T).to(u.dtype)
    centre = torch.zeros(T, u.shape[1], dtype=u.dtype).index_add_(0, tid, u) / count[:, None]
    radius = torch.zeros(T, dtype=u.dtype).scatter_reduce(
        0, tid, (u - centre[tid]).norm(dim=1), "amax")
    bound = u @ centre.T + radius[None, :]  # (N, T): no j in tile T scores above this
    tr, tc = torch.arange(T) // per_row, torch.arange(T) % per_row
    adjacent = ((tr[:, None] - tr[None, :]).abs() <= 1) & ((tc[:, None] - tc[None, :]).abs() <= 1)
    near = adjacent[tid]  # (N, T): the 3 x 3 tiles around each row's own, computed first
    found = S.masked_fill(~near[:, tid], -2).max(1).values  # the best score in them
    skip = (bound < found[:, None]) & ~near  # (N, T)
    every = torch.stack([skip[tid == t].all(0) for t in range(T)])  # (T, T): whole blocks
    return {"row_tile": float(skip.double().mean()), "tile_tile": float(every.double().mean())}


def best_case_ms(u: torch.Tensor, side: int, tile: int, skipped: float) -> dict:
    """Median ms of the dense u u^T against a batched GEMM of the (1 - skipped) fraction of its
    (tile, tile) blocks, float32, 30 interleaved rounds."""
    N, E = u.shape
    if side % tile:
        return None  # tiles that do not divide the grid: not timed
    r, c = torch.arange(N) // side, torch.arange(N) % side
    order = torch.argsort((r // tile) * side * side + (c // tile) * tile * tile
                          + (r % tile) * tile + c % tile)  # rows grouped tile by tile
    tiles = u[order].reshape(-1, tile * tile, E)  # (T, tile^2, E); a full grid of tiles
    T = tiles.shape[0]
    kept = torch.randperm(T * T, generator=torch.Generator().manual_seed(0))[
        :round(T * T * (1 - skipped))]
    a, b = kept // T, kept % T
    with torch.inference_mode():
        times = interleaved({"dense": lambda: u @ u.T,
                             "kept_blocks": lambda: torch.bmm(tiles[a], tiles[b].transpose(1, 2))},
                            30)
    return {key: round(median_ms(v), 3) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=896)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--tiles", default="4,8,16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    info = start_script()
    torch.set_grad_enabled(False)
    model = focus.load(args.size)
    x = photos(NAMES[:args.photos], args.size)
    vit, side = model.backbone, args.size // focus.PATCH
    inputs = []  # the unit image rows at the input of each block of BLOCKS, per photo
    for i in range(len(x)):
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x[i:i + 1])))
        for k, block in enumerate(vit.blocks):
            if k in BLOCKS:
                inputs.append(F.normalize(t[0, vit.num_prefix_tokens:].double(), dim=-1))
            t = block(t)
    photo = len(x) // 2
    timed = photo * len(BLOCKS) + BLOCKS.index(5)  # the input of block 5 of the middle photo
    rows = []
    for tile in (int(t) for t in args.tiles.split(",")):
        found = [skippable(u, side, tile) for u in inputs]
        skipped = statistics.mean(f["tile_tile"] for f in found)
        timing = best_case_ms(inputs[timed].float(), side, tile, skipped)
        row = {"timing_ms": timing, "tile": tile, **{key: {"mean": round(statistics.mean(f[key] for f in found), 4),
                                      "min": round(min(f[key] for f in found), 4),
                                      "max": round(max(f[key] for f in found), 4)}
                                for key in ("row_tile", "tile_tile")}}
        rows.append(row)
        print(row, flush=True)
    write_json(args.json, {"header": info, "args": vars(args) | {"json": str(args.json)},
                           "size": args.size, "image_tokens": side * side,
                           "photos": NAMES[:args.photos], "blocks": list(BLOCKS),
                           "timed_on": f"{NAMES[photo]}, the input of block 5",
                           "tiles": rows})


if __name__ == "__main__":
    main()
