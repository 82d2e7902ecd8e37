"""What merging costs and can save, measured: the library's one measurement API.

    costs = mpm_fx.costs.measure(model, x)               # block/merge cost curve, unmerged latency
    costs.merged_ms(schedule, counts)                    # predicted latency of a merged run
    costs.bound(schedule, counts)                        # the speed-up those counts allow
    merge_cost(tokens, {"mpm": {}, "tome": {"method": "tome", "r": 200}}, block=blk)
                                                         # one merge of each method, one block
    merge_share(model, x, (2, 5))                        # share of a run spent in its merges
    padding_share(report.token_counts)                   # padded rows of a batch after merges
    peak_tensor_bytes(lambda: mpm_fx.merge(x))           # peak live memory of one call

Every timing is ``interleaved``: each function once per round, round after round, medians.

Encoder blocks of one model share one architecture, so one block stands for all of them: a
merged run costs the unmerged latency, minus ``depth`` blocks at the full token count, plus one
block at each token count the merged encoder runs, plus one merge per scheduled block. The
embedding and the decoder do not shrink. Costs are medians of interleaved rounds (every count
timed once per round, so drift hits all counts alike), and counts between measured ones are
interpolated linearly.

Two users: the benchmark prints ``bound`` next to every measured speed-up (how close merging
gets to its own limit), and ``mpm_fx.tune`` ranks candidate schedules by ``merged_ms``, which
is smooth in the token counts where a per-candidate timing is noisy.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mpm_fx.errors import MPMError
from mpm_fx.methods.mpm import merge
from mpm_fx.schedule import normalize_schedule

__all__ = ["CostModel", "measure", "measure_cached", "token_path", "interleaved", "merge_cost",
           "merge_share", "padding_share", "recorded_merges", "peak_tensor_bytes"]


@dataclass(frozen=True)
class CostModel:
    depth: int  # encoder blocks
    prefix: int  # prefix tokens (never merged)
    image_tokens: int  # N0
    block_ms: dict  # total tokens (prefix + image) -> median ms of one block
    merge_ms: dict  # image tokens entering a merge -> median ms of one merge
    unmerged_ms: float  # median ms of the whole unmerged model
    backend: str = "eager"  # how the block ran: "eager" or "inductor"

    def block(self, tokens: float) -> float:
        return _interp(self.block_ms, tokens)

    def merge(self, image_tokens: float) -> float:
        return _interp(self.merge_ms, image_tokens)

    def encoder_ms(self, schedule=(), counts=(), placement: str = "before_block") -> float:
        """Blocks plus merges of a run that merges at ``schedule`` down to ``counts`` image
        tokens (one count per merge; for a batch, the largest, as padding is computed).
        ``placement="after_attention"``: a block that merges runs its attention before the
        merge, counted as half a block at each count (attention is about half of a block's
        time at these sizes; the measured speed-up of a chosen setting says the rest). Every
        method's merge is costed as MPM's at the same count (a few per cent of a block); a merge
        before the block on its keys (``metric="keys"``) also runs the block's norm and key
        projection once more (about a twelfth of a ViT block's GEMM work), not counted here."""
        path = token_path(self.image_tokens, schedule, counts, self.depth)
        blocks = [self.block(self.prefix + n) for n in path]
        if placement == "after_attention":
            for k, n in zip(normalize_schedule(schedule), self._entering(schedule, path)):
                blocks[k] = (blocks[k] + self.block(self.prefix + n)) / 2
        return sum(blocks) + sum(self.merge(n) for n in self._entering(schedule, path))

    @property
    def consistent(self) -> bool:
        """Whether the timings agree with each other: the encoder's blocks, timed alone, must
        cost less than the whole unmerged model. Noise (a busy machine) can break this; then
        no bound on the whole model can be computed from them."""
        return 0 < self.encoder_ms() < self.unmerged_ms

    def merged_ms(self, schedule, counts, placement: str = "before_block") -> float:
        """Predicted latency of the whole merged model: what does not shrink (the unmerged
        latency minus its encoder, 0 if noise makes that negative) plus the merged encoder."""
        return (max(self.unmerged_ms - self.encoder_ms(), 0.0)
                + self.encoder_ms(schedule, counts, placement))

    def bound(self, schedule, counts) -> dict:
        """The speed-ups these token counts allow: whole model and encoder alone. Either is
        None when the timings cannot give it (``consistent`` is False, or a cost came out
        <= 0): noise, not a figure to print."""
        encoder, merged = self.encoder_ms(), self.encoder_ms(schedule, counts)
        encoder_bound = encoder / merged if encoder > 0 and merged > 0 else None
        model = (self.unmerged_ms / self.merged_ms(schedule, counts)
                 if self.consistent and encoder_bound is not None else None)
        return {"model": model, "encoder": encoder_bound}

    def predicted_merge_share(self, schedule, counts, merged_ms: float) -> float:
        """Share of a measured merged latency that the merges at these counts take, from the
        cost curve (``merge_share`` measures a run's own merges instead)."""
        path = token_path(self.image_tokens, schedule, counts, self.depth)
        return sum(self.merge(n) for n in self._entering(schedule, path)) / merged_ms

    def _entering(self, schedule, path) -> list:
        """Image tokens entering each merge: those of the block before it."""
        return [self.image_tokens if k == 0 else path[k - 1] for k in normalize_schedule(schedule)]


def token_path(image_tokens: int, schedule, counts, depth: int) -> list:
    """Image tokens each of the ``depth`` blocks runs on."""
    schedule, counts = normalize_schedule(schedule), list(counts)
    if len(schedule) != len(counts):
        raise MPMError(f"one token count per merge: schedule {tuple(schedule)} has "
                       f"{len(schedule)} merges, got {len(counts)} counts")
    path, n, merged = [], image_tokens, dict(zip(schedule, counts))
    for j in range(depth):
        n = merged.get(j, n)
        path.append(n)
    return path


def measure(model: nn.Module, example, *, tokens=None, points: int = 8, repeats: int = 10,
            backend: str = "eager", time_model: bool = True, report=None,
            progress=None, sync=None) -> CostModel:
    """Time ``model`` unmerged on ``example`` and one of its encoder blocks (and one merge) at
    several token counts.

    tokens:   image-token counts to time (default: ``points`` counts spread over 1..N0).
    backend:  "eager", or "inductor": the block compiled once with dynamic shapes, the merge of
              all N0 tokens compiled with static shapes and the later ones with an unbacked
              token count, as in a compiled merged model (the first merge knows its N0; later
              ones get a data-dependent count).
    time_model: time the whole unmerged model too (else ``unmerged_ms`` is NaN: set it with
              ``dataclasses.replace`` from a measurement of your own).
    report:   an ``mpm_report()`` of the model at the example's image size (it names the
              blocks); without it the model is captured once to find them.
    progress: optional callable(done, total) for a progress bar.
    sync:     called before each clock read (``torch.cuda.synchronize`` on a GPU).

    The block is called with the real hidden states of ``example`` at its input, cut to the
    first ``prefix + n`` tokens; a block that takes other tensors (a mask sized by the token
    count) is not supported and raises ``MPMError``.
    """
    from mpm_fx.optimized import optimize

    if backend not in ("eager", "inductor"):
        raise MPMError(f"backend must be 'eager' or 'inductor', got {backend!r}")
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if report is None:
        report = optimize(model, (), example_inputs=example).mpm_report()
    depth, P, N = len(report.blocks), report.prefix_tokens, report.image_tokens
    block = model.get_submodule(report.blocks[0][1])
    hidden = _block_input(model, block, example)
    if tokens is None:
        tokens = sorted({max(1, round(N * (i + 1) / points)) for i in range(points)} | {N})
    tokens = sorted(set(int(n) for n in tokens) | {N})
    if not all(1 <= n <= N for n in tokens):
        raise MPMError(f"token counts must lie in 1..{N}, got {tokens}")

    xs = {n: hidden[:, :P + n].contiguous() for n in tokens}
    merging = {n: xs[n].clone() for n in tokens if n > 1}
    run_block, first, later = block, _merging(P), _merging(P)
    if backend == "inductor":
        run_block = torch.compile(block, dynamic=True)
        first, later = (torch.compile(f, dynamic=False, fullgraph=True) for f in (first, later))
        for n, x in merging.items():
            if n != N:
                torch._dynamo.decorators.mark_unbacked(x, 1)
    fns = {("model", 0): lambda: model(*example)} if time_model else {}
    fns.update({("block", n): (lambda n=n: run_block(xs[n])) for n in tokens})
    fns.update({("merge", n): (lambda n=n, f=first if n == N else later: f(merging[n]))
                for n in merging})
    with torch.inference_mode():
        times = interleaved(fns, repeats, progress=progress, sync=sync)
    med = {key: statistics.median(v) for key, v in times.items()}
    return CostModel(depth, P, N, {P + n: med["block", n] for n in tokens},
                     {n: med["merge", n] for n in tokens if n > 1} or {N: 0.0},
                     med.get(("model", 0), float("nan")), backend)


def measure_cached(model: nn.Module, example, *, recalibrate: bool = False, **kwargs) -> CostModel:
    """``measure`` once per machine, model shape, input shape and settings; later calls read
    the costs back from the cache (``$MPM_FX_CACHE`` or ``~/.cache/mpm_fx``, ``costs/``), so
    that rankings built on them are the same run after run (timing noise cannot reorder them).
    ``recalibrate=True`` measures again and replaces the cached costs."""
    import hashlib
    import json
    import os
    import platform
    from pathlib import Path

    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    signature = {
        "machine": platform.machine(), "cpu": _cpu_name(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model": type(model).__qualname__,
        "parameters": [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
        "inputs": [(list(x.shape), str(x.dtype)) for x in example],
        "settings": {k: v for k, v in kwargs.items() if k not in ("report", "progress")},
    }
    key = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()
    root = os.environ.get("MPM_FX_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpm_fx"
    path = Path(root) / "costs" / f"{key[:24]}.json"
    if path.exists() and not recalibrate:
        data = json.loads(path.read_text())
        for table in ("block_ms", "merge_ms"):
            data[table] = {int(k): v for k, v in data[table].items()}
        return CostModel(**data)
    costs = measure(model, example, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(dataclasses.asdict(costs)))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return costs


def merge_cost(tokens: torch.Tensor, methods: dict, *, prefix: int = 1, block=None,
               backend: str = "eager", repeats: int = 10, patch_grid=None, keys=None,
               sync=None) -> dict:
    """Milliseconds of one merge of each method on ``tokens`` (B, P + N, D), and of ``block``
    on them if given, in the same interleaved rounds: {label: ms, "block": ms}.

    methods:  {label: ``mpm_fx.methods.merging`` keyword arguments}, e.g. {"mpm": {},
              "forest": {"method": "forest", "r": 200}} (the first merge of a schedule);
    keys:     (B, P + N, E), the metric of the methods placed after the attention (its keys
              averaged over heads, as in a model; default: the tokens themselves);
    backend:  "eager", or "inductor": each merge compiled with the static shapes of a first
              merge, the block with dynamic shapes;
    patch_grid: (rows, cols) of the image tokens, for the methods that read positions.
    """
    from mpm_fx.methods import merging

    calls = {}
    for label, options in methods.items():
        chosen = merging(**options)
        kwargs = {"prefix": prefix, **chosen.kwargs(0, patch_grid=patch_grid)}
        if keys is not None and chosen.placement == "after_attention":
            kwargs["metric"] = keys
        call = (lambda op=chosen.op, kw=kwargs: lambda t: op(t, **kw))()
        calls[label] = (torch.compile(call, fullgraph=True, dynamic=False)
                        if backend == "inductor" else call)
    if block is not None:
        calls["block"] = torch.compile(block, dynamic=True) if backend == "inductor" else block
    with torch.inference_mode():
        times = interleaved({k: (lambda f=f: f(tokens)) for k, f in calls.items()}, repeats,
                            sync=sync)
    return {k: statistics.median(v) for k, v in times.items()}


def merge_share(model: nn.Module, x, schedule, *, backend: str = "eager", repeats: int = 5,
                sync=None, **method_options) -> dict:
    """The share of one merged run's time spent in its merges: the run (``optimize``, or
    ``mpm_inductor``) and each of its merges again alone with the inputs it received
    (``recorded_merges``), in the same interleaved rounds. Compiled, the merges are compiled
    alone as in the model: the first with static shapes, the later ones of the methods that
    pad with an unbacked token count (no padding mask at batch 1).
    Returns {"model_ms", "merges_ms", "share"}."""
    import copy

    from mpm_fx.methods import merging
    from mpm_fx.optimized import optimize
    from mpm_fx.passes import rewrite

    x = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    schedule = normalize_schedule(schedule)
    chosen = merging(schedule=schedule, **method_options)
    program = rewrite(model, x, {}, schedule, method=chosen, token_counts=False)
    calls = recorded_merges(program, x)
    if backend == "inductor":
        run = torch.compile(copy.deepcopy(model), backend="mpm_inductor", dynamic=False,
                            options={"schedule": schedule, **method_options})
        compiled = []
        for i, (op, args, kwargs) in enumerate(calls):
            f = torch.compile(op, fullgraph=True, dynamic=False)
            if i and chosen.pads:  # later merges: the token count is data-dependent in the model
                args = (args[0].clone(), None)
                torch._dynamo.decorators.mark_unbacked(args[0], 1)
            compiled.append((f, args, kwargs))
        calls = compiled
    else:
        run = optimize(model, schedule, **method_options)
    fns = {"model": lambda: run(*x)} | {i: (lambda f=f, a=a, k=k: f(*a, **k))
                                        for i, (f, a, k) in enumerate(calls)}
    with torch.inference_mode():
        times = interleaved(fns, repeats, sync=sync)
    model_ms = statistics.median(times["model"])
    merges_ms = sum(statistics.median(times[i]) for i in range(len(calls)))
    return {"model_ms": model_ms, "merges_ms": merges_ms, "share": merges_ms / model_ms}


def recorded_merges(program, inputs) -> list:
    """(op, args, kwargs) of every merge call of one run of ``program`` (``passes.rewrite``'s
    result) on ``inputs``, with the real values each received (cloned)."""
    from torch import fx

    from mpm_fx.passes.graph import MARK

    calls = []

    def cloned(v):
        return v.clone() if isinstance(v, torch.Tensor) else v

    class Record(fx.Interpreter):
        def run_node(self, node):
            if node.op == "call_function" and node.meta.get(MARK) == "merge" \
                    and getattr(node.target, "__name__", "") == "merge":
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                calls.append((node.target, tuple(map(cloned, args)),
                              {k: cloned(v) for k, v in kwargs.items()}))
            return super().run_node(node)

    with torch.inference_mode():
        Record(program.gm).run(*inputs)
    return calls


def padding_share(token_counts) -> float:
    """Padded token rows over all rows after the merges of one batch: ``token_counts`` per
    merge, per image (``Report.token_counts``); each merge pads every image to the largest."""
    rows = sum(max(c) * len(c) for c in token_counts)
    return sum(max(c) * len(c) - sum(c) for c in token_counts) / rows if rows else 0.0


def peak_tensor_bytes(fn) -> tuple[int, object]:
    """(peak bytes of tensors allocated by ``fn`` and alive at once, fn's result), from the
    allocator's own events: ``torch.profiler`` with profile_memory=True gives each op event
    the bytes it allocated itself (net of what it freed inside), and ``[memory]`` events the
    frees between ops; summed in time order they give the live bytes. Tensors alive before
    the call do not count; the result does. A temporary made and freed inside one aten op is
    not seen."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor()


def _merging(prefix: int):
    return lambda x: merge(x, prefix=prefix)


def _block_input(model, block, example) -> torch.Tensor:
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("args", (args, kwargs))

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(*example)
    finally:
        handle.remove()
    args, kwargs = seen["args"]
    others = [v for v in list(args[1:]) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    if not args or not isinstance(args[0], torch.Tensor) or others:
        raise MPMError("the cost model times an encoder block on its token tensor alone, but "
                       f"{type(block).__name__} also takes other tensors; rank schedules by "
                       "measured latency instead (mpm_fx.tune(..., rank='measured'))")
    return args[0]


def interleaved(fns: dict, repeats: int, *, warmup: int = 2, progress=None, sync=None,
                settle: float = 0.0) -> dict:
    """Milliseconds of every call: each fn runs once per round, round after round, so that
    drift hits all alike. ``progress(done, repeats)`` is called after each round; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before each clock read, so that a call's time includes
    the device work it queued. ``settle``: seconds of quiet before each timed call, for rounds
    that mix runtimes with their own thread pools: ONNX Runtime's intra-op threads spin after
    a run (its default) and, on two cores, slowed the next torch call by 35 % (224 px, real
    model: 99 ms alone, 135-146 ms right after ONNX Runtime, 115-119 ms after 20 ms of quiet)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):  # (and the one compile of an inductor block)
        for fn in fns.values():
            fn()
    times = {key: [] for key in fns}
    for r in range(repeats):
        for key, fn in fns.items():
            sync()
            if settle:
                time.sleep(settle)
            start = time.perf_counter()
            fn()
            sync()
            times[key].append((time.perf_counter() - start) * 1e3)
        if progress is not None:
            progress(r + 1, repeats)
    return times


def _interp(table: dict, x: float) -> float:
    keys = sorted(table)
    if len(keys) == 1:
        return table[keys[0]]
    values = [table[k] for k in keys]
    if x < keys[0] or x > keys[-1]:  # linear extrapolation from the nearest two points
        i = 0 if x < keys[0] else len(keys) - 2
        slope = (values[i + 1] - values[i]) / (keys[i + 1] - keys[i])
        return values[i] + slope * (x - keys[i])
    return float(np.interp(x, keys, values))
