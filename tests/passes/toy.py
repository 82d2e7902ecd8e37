"""A two-block toy ViT for the pass tests, an eager oracle for it, and a way to run any list of
passes on it and keep the graph before and after (the vLLM ``TestBackend`` idea).

The toy takes (B, N, 4) "patches", embeds them, puts one learned CLS token in front, runs pre-norm
blocks (single-head SDPA on (B, T, D), so no size literal follows the token count and a graph
with merges runs without ``follow_token_count``; or multi-head, or explicit softmax) and a
per-token head on the image tokens.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import mpm_fx
from mpm_fx.methods import merging
from mpm_fx.passes import PIPELINE, analyse, capture, run_pipeline
from mpm_fx.passes.context import PassContext


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 1, softmax: bool = False):
        super().__init__()
        self.heads, self.softmax = heads, softmax
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        if self.heads > 1:  # (B, H, T, C / H): reshapes that name the token count
            q, k, v = (t.reshape(B, T, self.heads, C // self.heads).transpose(1, 2)
                       for t in (q, k, v))
        if self.softmax:
            a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        if self.heads > 1:
            a = a.transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class Toy(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 2, heads: int = 1, softmax: bool = False):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim, heads, softmax) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, patches):
        x = torch.cat([self.cls.expand(patches.shape[0], -1, -1), self.embed(patches)], 1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 1:])


def toy(seed: int = 0, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kw).double().eval()


def patches(batch: int = 1, n: int = 12, seed: int = 1) -> torch.Tensor:
    """(B, n, 4) random patches; image b repeats its first n/2 - 2b rows at the end, so that
    merges pair tokens and the images of a batch merge to different counts."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(batch, n, 4, generator=g, dtype=torch.float64)
    for b in range(batch):
        k = max(n // 2 - 2 * b, 1)
        rows[b, n - k:] = rows[b, :k]
    return rows


def oracle(model: Toy, x: torch.Tensor, schedule) -> torch.Tensor:
    """Eager MPM on the toy, one image at a time: merge before the scheduled blocks, rebuild
    before the final norm. Independent of the pass."""
    outs = []
    for i in range(len(x)):
        state = {"map": None}

        def merge_before(module, args):
            r = mpm_fx.merge(args[0], prefix=1)
            state["map"] = r.merge_map if state["map"] is None else mpm_fx.compose(state["map"],
                                                                                   r.merge_map)
            return (r.tokens,)

        def rebuild(module, args):
            return None if state["map"] is None else (
                mpm_fx.reconstruct(args[0], state["map"], prefix=1),)

        hooks = [model.blocks[k].register_forward_pre_hook(merge_before) for k in schedule]
        hooks.append(model.norm.register_forward_pre_hook(rebuild))
        try:
            with torch.no_grad():
                outs.append(model(x[i:i + 1]))
        finally:
            for h in hooks:
                h.remove()
    return torch.cat(outs)


class Run:
    """The graph before and after some passes on one model and input, and the context."""

    def __init__(self, model, x, schedule, passes=PIPELINE, *, method="mpm",
                 token_counts=False, encoder_outputs=False, **options):
        """``options``: the merge method's (``mpm_fx.methods.merging``), e.g. size_aware."""
        captured = capture(model, (x,), {})
        self.inputs = [x]
        self.ctx = PassContext(analyse(captured.gm, self.inputs), tuple(schedule), self.inputs,
                           method=merging(method, schedule=tuple(schedule), **options),
                           token_counts=token_counts, encoder_outputs=encoder_outputs)
        self.before = copy.deepcopy(captured.gm)
        self.after = run_pipeline(captured.gm, self.ctx, passes)

    def __call__(self, x=None):
        with torch.no_grad():
            out = self.after(*([x] if x is not None else self.inputs))
        return out[0] if len(out) == 1 else out

    @staticmethod
    def ops(gm) -> Counter:
        """How many call_function nodes of each target."""
        return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")

    def added(self, target) -> int:
        return self.ops(self.after)[target] - self.ops(self.before)[target]
