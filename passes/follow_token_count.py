"""Follow the token count: after a merge, every size that was the token count becomes symbolic.

The capture is static, so a block after a merge still says ``reshape(qkv, [1, 197, 3, 6, 64])``.
The merged count is only known at run time (it is data-dependent), so such literals must become
expressions of the tensors' own sizes: ``[1, sym_size(qkv, 1), 3, 6, 64]``.

Which literals to rewrite is decided by running the rewritten graph once on fake tensors, with
each merge stubbed to return a *probe* count of tokens (a prime, so that no other size divides
it by accident). Every tensor dim whose probe size differs from its captured size depends on the
token count. Then, for each op with size arguments (schema type ``SymInt`` or ``SymInt[]``) whose
input has such a dim, the argument is rewritten by a rule of that op:

- ``view``/``reshape``/``unflatten``: input and output dims are grouped by equal products (how
  ``view`` itself pairs them); in a group whose input changed, the one output size that can
  absorb the change (the probe product stays divisible by the rest) becomes
  ``prod(sym_size(x, d)) * c // rest``;
- ``expand``: a size equal to a changed input dim becomes ``sym_size(x, d)``;
- ``slice``/``select``/``split_with_sizes`` on the token dim: bounds inside the prefix stay;
  an end at the old count becomes the new count; the image-token part of a split absorbs the
  change;
- any other op with a size argument equal to a changed dim is reported, never guessed.

The probe then checks that every graph output has its captured shape again (the reconstruction
gathers restore the full grid).

Position tables (position-aware merging): a tensor of the model indexed by token position that
meets merged tokens in an elementwise op or as an SDPA mask (a rotary cos/sin table, a relative-
position bias) keeps its captured shape while the tokens' shape changes. Its token axes are the
dims that line up, right-aligned, with a changed dim of the other operand and have that dim's
captured size; the table is gathered along them by the leaders of the merged tokens
(``ops.leaders``, ``ops.gather_positions``), once per table and merge point:

    before:  q_rot = q * cos                      (q: (B, H, 131, 64), cos: (196, 64))
    after:   q_rot = q * gather_positions(cos, leaders(total_map, valid), axes=((-2, 0),), rank=4)
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from mpm_fx import ops
from mpm_fx.errors import UnsupportedGraph
from mpm_fx.passes.analysis import POSITION_READERS, Analysis, blocks_with_the_same_op, merge_room
from mpm_fx.passes.context import PassContext
from mpm_fx.passes.graph import captured_shape, insert, is_sdpa, module_path, sdpa_args

__all__ = ["follow_token_count", "probe_counts"]

aten = torch.ops.aten
_SIZE_TYPES = ("SymInt", "SymInt[]", "SymInt?", "SymInt[]?")


def probe_counts(image_tokens: int, merges: int, prefix: int = 0) -> list:
    """Image-token counts the probe gives each merge, each in [ceil(N/2), N), chosen so that the
    stream length P + n is a prime: no other size divides it by accident."""
    counts, n = [], image_tokens
    for _ in range(merges):
        low = (n + 1) // 2
        new = next((m for m in range(n - 1, low - 1, -1) if _is_prime(prefix + m)), max(n - 1, 1))
        counts.append(new)
        n = new
    return counts


def follow_token_count(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Size arguments that were the token count become expressions of the merged count."""
    if not ctx.merges_anything:
        return gm
    encoder, merges = ctx.analysis, ctx.merges
    counts = probe_counts(encoder.image_tokens, len(merges.points), encoder.prefix_tokens)
    merge_calls = {p.tokens.args[0]: n for p, n in zip(merges.points, counts)}
    probe = _Probe(gm, encoder, merge_calls, merges)
    probe.run(ctx.inputs)
    ctx.stats["symbolic_sizes"] = probe.rewritten
    ctx.stats["gathered_positions"] = probe.gathered
    return gm


class _Probe:
    def __init__(self, gm: fx.GraphModule, encoder: Analysis, merge_calls: dict, merges=None):
        self.gm, self.graph = gm, gm.graph
        self.encoder, self.prefix = encoder, encoder.prefix_tokens
        self.merge_calls, self.merges = merge_calls, merges
        self.block_of = {n: b.index for b in encoder.blocks for n in b.body}
        self.env: dict = {}
        self.rewritten = 0
        self.gathered = 0
        self._leaders: dict = {}  # merge point -> its ops.leaders node
        self._tables: dict = {}  # (table, point, axes, rank, per_image) -> gather node

    def run(self, flat_inputs: list) -> None:
        """Every node on fake tensors (the merges stubbed), except the values computed from the
        model's own parameters, buffers and constants alone: those run on their real values,
        so that a scalar the model reads from its state (``item()`` of a buffer, a branch
        specialised at capture) is a number, not a data-dependent size."""
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        inputs = iter(flat_inputs)
        own = set()  # nodes computed from the model's state and constants only
        with mode, _quiet_fake_tensor_errors():
            for node in list(self.graph.nodes):
                if node.op == "placeholder":
                    self.env[node] = _fake(mode, next(inputs))
                elif node.op == "get_attr":
                    self.env[node] = operator.attrgetter(node.target)(self.gm)
                    own.add(node)
                elif node.op == "call_module":
                    self.env[node] = None  # export's input guards: shapes are keyed by the caller
                elif node.op == "call_function" and node not in self.merge_calls and all(
                        a in own for a in node.all_input_nodes):
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.env.get)
                    with unset_fake_temporarily(), torch.no_grad():
                        self.env[node] = node.target(*args, **kwargs)
                    own.add(node)
                elif node.op == "call_function":
                    self.env[node] = self._call(node)
                elif node.op == "output":
                    self._check_outputs(node)

    # -- one node ---------------------------------------------------------------------------
    def _call(self, node: fx.Node):
        if node in self.merge_calls:
            return self._merge_stub(node, self.merge_calls[node])
        if self._changed_inputs(node):
            self._gather_positions(node)
            rule = _RULES.get(node.target, _Probe._refuse_size_literals)
            rule(self, node)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n])
        try:
            return node.target(*args, **kwargs)
        except Exception as e:
            self.refuse(node, f"fails once the token count changes ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0]}): it depends on the number of "
                              "tokens in a way mpm_fx cannot follow", cause=e)

    def _merge_stub(self, node: fx.Node, n: int):
        x = self.env[node.args[0]]
        B, T, _ = x.shape
        tokens = x[:, :self.prefix + n]
        merge_map = torch.zeros(B, T - self.prefix, dtype=torch.long, device=x.device)
        return ops.MergeResult(tokens, merge_map, torch.ones(B, n, dtype=torch.bool,
                                                             device=x.device))

    # -- position-aware merging ---------------------------------------------------------------
    def _gather_positions(self, node: fx.Node) -> None:
        """A table indexed by token position (rotary cos/sin, a relative-position bias) that
        meets merged tokens in an elementwise op or as an SDPA mask is gathered by the merged
        tokens' leaders. Its token axes are the dims that line up, right-aligned, with a dim
        of the other operand whose size follows the token count, and have its captured size."""
        if self.merges is None or node not in self.block_of:
            return
        point = self._point(node)
        if point is None:
            return
        if is_sdpa(node):
            args = sdpa_args(node)
            q, k, mask = args["query"], args["key"], args.get("attn_mask")
            if not isinstance(mask, fx.Node):
                return
            # the mask broadcasts against the scores (..., L, S): L from q, S from k
            shape = tuple(captured_shape(q)[:-1]) + (captured_shape(k)[-2],)
            rank = len(shape)
            moved = set()
            if len(captured_shape(q)) - 2 in self.changed(q):
                moved.add(rank - 2)
            if len(captured_shape(k)) - 2 in self.changed(k):
                moved.add(rank - 1)
            references, tables = [(shape, moved)], [mask]
        elif node.target in POSITION_READERS:
            operands = [a for a in node.all_input_nodes if self.changed(a)]
            references = [(captured_shape(a), set(self.changed(a))) for a in operands]
            tables = [a for a in node.all_input_nodes if a not in operands]
        else:
            return
        for table in tables:
            axes = self._token_axes(table, references)
            if not axes:
                continue
            if self._from_images(table):
                self.refuse(node, f"reads {table.name}, a tensor of shape {captured_shape(table)} "
                                  "indexed by token position and computed from the inputs (an "
                                  "attention mask of the user's): mpm_fx gathers only the "
                                  "model's own position tables for merged tokens")
            shape = max(references, key=lambda r: len(r[0]))[0]
            if len(captured_shape(table)) > len(shape):
                self.refuse(node, f"reads {table.name}, a tensor of shape "
                                  f"{captured_shape(table)} indexed by token position with more "
                                  f"dims than the tokens it meets ({shape}): mpm_fx cannot tell "
                                  "which of its dims holds the images")
            shared = len(captured_shape(table)) < len(shape) or captured_shape(table)[0] == 1
            per_image = shape[0] // self.encoder.batch if shared else 1
            gathered = self._gather(node, table, point, tuple(axes), len(shape), per_image)
            node.args = fx.node.map_arg(node.args, lambda a: gathered if a is table else a)
            node.kwargs = fx.node.map_arg(node.kwargs, lambda a: gathered if a is table else a)

    def _point(self, node: fx.Node):
        """The merge whose tokens ``node`` (inside an encoder block) computes on: one after
        its block's attention for the nodes after it, else the one its attention runs on."""
        k = self.block_of[node]
        block, order = self.encoder.blocks[k], self.encoder.order
        for p in self.merges.points:
            if (p.block == k and p.placement == "after_attention" and node is not block.middle
                    and node in order.index and order.depends(node, block.middle)):
                return p
        return self.merges.in_block(k)

    def _token_axes(self, table: fx.Node, references: list) -> list:
        """[(axis from the right, prefix tokens it holds)] of an unchanged tensor."""
        shape = captured_shape(table)
        if shape is None or self.changed(table):
            return []
        axes = []
        for d in range(1, len(shape) + 1):
            if any(d <= len(ref) and len(ref) - d in moved and ref[-d] == shape[-d] > 1
                   for ref, moved in references):
                prefix = self.prefix if shape[-d] == self.encoder.tokens else 0
                axes.append((-d, prefix))
        return axes

    def _from_images(self, table: fx.Node) -> bool:
        order = self.encoder.order
        if table not in order.index:
            return True  # made by an earlier pass from merged tokens: not a table of the model
        return any(order.depends(table, p) for p in self.encoder.images)

    def _gather(self, node, table, point, axes, rank, per_image) -> fx.Node:
        key = (table, point, axes, rank, per_image)
        if key not in self._tables:
            leaders = self._leaders_of(point)
            gathered = insert(self.graph, "positions", ops.gather_positions, (table, leaders),
                              {"axes": axes, "rank": rank, "per_image": per_image}, before=node)
            self.env[gathered] = ops.gather_positions(self.env[table], self.env[leaders],
                                                      axes=axes, rank=rank, per_image=per_image)
            self._tables[key] = gathered
            self.gathered += 1
        return self._tables[key]

    def _leaders_of(self, point) -> fx.Node:
        if point not in self._leaders:
            leaders = insert(self.graph, "leaders", ops.leaders, (point.total_map, point.valid),
                             after=point.last)
            self.env[leaders] = ops.leaders(self.env[point.total_map], self.env[point.valid])
            self._leaders[point] = leaders
        return self._leaders[point]

    def _changed_inputs(self, node: fx.Node) -> bool:
        return any(self.changed(a) for a in node.all_input_nodes)

    def changed(self, node: fx.Node) -> list:
        """Dims of ``node`` whose probe size differs from its captured size."""
        before, now = captured_shape(node), self.shape(node)
        if before is None or now is None or len(before) != len(now):
            return []
        return [d for d, (a, b) in enumerate(zip(before, now)) if a != b]

    def shape(self, node: fx.Node):
        val = self.env.get(node)
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None

    def _refuse_size_literals(self, node: fx.Node) -> None:
        sizes = {captured_shape(a)[d] for a in node.all_input_nodes for d in self.changed(a)}
        for name, value in _size_arguments(node):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and v in sizes and v > 1:
                    self.refuse(node, f"has the size argument {name}={value!r}, which equals "
                                      "the captured token count, and mpm_fx has no rule for "
                                      "how it follows a merge (report the op so one can be "
                                      "added)")

    def refuse(self, node: fx.Node, what: str, cause: Exception | None = None) -> None:
        """An UnsupportedGraph naming the op, what it does, and where merges can still go."""
        same = blocks_with_the_same_op(self.encoder, node)
        room = (merge_room(same, len(self.encoder.blocks), "hold this op") if same else
                "schedule merges only before blocks where it does not run")
        raise UnsupportedGraph(
            f"{module_path(node)} ({node.name}: {_target_name(node)}) {what}. mpm_fx cannot "
            f"merge before a block that does this; {room}.") from cause

    def _check_outputs(self, node: fx.Node) -> None:
        for i, out in enumerate(node.args[0]):
            if isinstance(out, fx.Node) and self.changed(out):
                raise UnsupportedGraph(
                    f"graph output {i} ({out.name}, from {module_path(out)}) would change shape "
                    f"from {captured_shape(out)} to {self.shape(out)} after merging: encoder "
                    "tokens reach it by a path that is not a residual-stream tap. Schedule "
                    "merges after the block it comes from.")

    # -- building size expressions ----------------------------------------------------------------
    def size_expr(self, node: fx.Node, x: fx.Node, dims: list, mul: int = 1, div: int = 1,
                  sub: int = 0):
        """An FX expression for ``prod(x.size(d) for d in dims) * mul // div - sub``."""
        value = math.prod(self.shape(x)[d] for d in dims) * mul
        if value % div:
            raise UnsupportedGraph(f"{module_path(node)} ({node.name}): size {value} is not "
                                   f"divisible by {div} once the token count changes")
        g = math.gcd(mul, div)
        mul, div = mul // g, div // g
        expr = None
        for d in dims:
            term = insert(self.graph, "size", aten.sym_size.int, (x, d), before=node)
            expr = term if expr is None else insert(self.graph, "size", operator.mul,
                                                    (expr, term), before=node)
        for op, c in ((operator.mul, mul), (operator.floordiv, div), (operator.sub, sub)):
            if c != (0 if op is operator.sub else 1):
                expr = insert(self.graph, "size", op, (expr, c), before=node)
        self.env[expr] = value // div - sub  # new nodes are not in the run list
        self.rewritten += 1
        return expr


# -- rules, one per op family ---------------------------------------------------------------------

def _view(probe: _Probe, node: fx.Node) -> None:
    x, sizes = node.args[0], list(node.args[1])
    node.args = (x, _regroup(probe, node, x, sizes, captured_shape(node))) + node.args[2:]


def _unflatten(probe: _Probe, node: fx.Node) -> None:
    x, dim, sizes = node.args[:3]
    before = captured_shape(x)
    dim = dim % len(before)
    if dim not in probe.changed(x):
        return
    out = captured_shape(node)[dim:dim + len(sizes)]
    new = _regroup(probe, node, x, list(sizes), out, in_dims=[dim])
    node.args = (x, dim, new) + tuple(node.args[3:])


def _regroup(probe, node, x, sizes, out_before, in_dims=None) -> list:
    """New size list for a view of x: the changed groups absorb the new count."""
    before = captured_shape(x)
    changed = set(probe.changed(x))
    in_before = [before[d] for d in in_dims] if in_dims else list(before)
    base = in_dims[0] if in_dims else 0
    new = list(sizes)
    for group_in, group_out in _groups(in_before, list(out_before)):
        moved = [base + d for d in group_in if base + d in changed]
        if not moved:
            continue
        now = math.prod(probe.shape(x)[base + d] for d in group_in)
        rest = {k: math.prod(out_before[o] for o in group_out if o != k) for k in group_out}
        fits = [k for k in group_out
                if not isinstance(sizes[k], fx.Node) and out_before[k] != 1 and now % rest[k] == 0]
        if len(fits) > 1:
            fits = [k for k in fits if sizes[k] == -1] or fits
        if len(fits) != 1:
            grid = [out_before[o] for o in group_out if out_before[o] != 1]
            if len(group_in) == 1 and len(grid) > 1:
                probe.refuse(node, f"reshapes to {sizes}, splitting the {in_before[group_in[0]]} "
                                   f"tokens into a {' x '.join(map(str, grid))} grid: a spatial "
                                   "layout (a decomposed relative-position bias, windowed "
                                   "attention) that merged tokens no longer have")
            probe.refuse(node, f"reshapes to {sizes}, mixing the token dim with other dims so "
                               "that mpm_fx cannot tell which size follows the token count "
                               f"(candidates: {[sizes[k] for k in fits] or 'none'})")
        k = fits[0]
        if sizes[k] != -1:
            const = math.prod(in_before[d] for d in group_in if base + d not in changed)
            new[k] = probe.size_expr(node, x, moved, const, rest[k])
    return new


def _groups(a: list, b: list) -> list:
    """Pair dims of two shapes of equal numel into groups of equal product, as view does."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        group_a, group_b, pa, pb = [], [], 1, 1
        while True:
            if i < len(a) and (not group_a or pa < pb):
                group_a.append(i)
                pa, i = pa * a[i], i + 1
            elif j < len(b) and (not group_b or pb < pa):
                group_b.append(j)
                pb, j = pb * b[j], j + 1
            else:
                break
        groups.append((group_a, group_b))
    return groups


def _expand(probe: _Probe, node: fx.Node) -> None:
    x, sizes = node.args[0], list(node.args[1])
    before = captured_shape(x)
    offset = len(sizes) - len(before)
    for d in probe.changed(x):
        k = d + offset
        if sizes[k] == before[d]:
            sizes[k] = probe.size_expr(node, x, [d])
        elif sizes[k] != -1:
            raise UnsupportedGraph(f"{module_path(node)} ({node.name}): expand to {sizes} "
                                   f"across the token dim {d} of {before}")
    node.args = (x, sizes) + node.args[2:]


def _slice(probe: _Probe, node: fx.Node) -> None:
    args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]  # x, dim, start, end, step
    x, dim, start, end = args[:4]
    before = captured_shape(x)
    dim %= len(before)
    if dim not in probe.changed(x):
        return
    T, start = before[dim], start or 0
    inside_prefix = end is not None and 0 <= end <= probe.prefix
    if not 0 <= start <= probe.prefix or not (end is None or inside_prefix or end >= T):
        probe.refuse(node, f"slices tokens [{start}:{end}] of {T}, and after a merge token "
                           "positions past the prefix no longer exist")
    if end == T:
        args[3] = probe.size_expr(node, x, [dim])
        node.args = tuple(args)


def _select(probe: _Probe, node: fx.Node) -> None:
    x, dim, index = node.args[:3]
    before = captured_shape(x)
    if dim % len(before) in probe.changed(x) and not 0 <= index < probe.prefix:
        probe.refuse(node, f"reads token {index} of {before[dim]}, and after a merge only "
                           "prefix tokens keep their position")


def _split_with_sizes(probe: _Probe, node: fx.Node) -> None:
    x, sizes = node.args[0], list(node.args[1])
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(
        captured_shape(x))
    if dim not in probe.changed(x):
        return
    image = [k for k, s in enumerate(sizes) if s > probe.prefix]
    if len(image) != 1:
        raise UnsupportedGraph(f"{module_path(node)} ({node.name}) splits the tokens into "
                               f"{sizes}: mpm_fx can only split off the prefix tokens")
    k = image[0]
    sizes[k] = probe.size_expr(node, x, [dim], sub=sum(sizes) - sizes[k])
    node.args = (x, sizes) + node.args[2:]


_RULES = {
    aten.view.default: _view,
    aten.reshape.default: _view,
    aten._unsafe_view.default: _view,
    aten.unflatten.int: _unflatten,
    aten.expand.default: _expand,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.split_with_sizes.default: _split_with_sizes,
}


# -- helpers ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_fake_tensor_errors():
    """An op that fails on the probe's sizes is reported as an UnsupportedGraph naming it;
    torch's fake-tensor logger would print the same failure as an ERROR traceback first."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _size_arguments(node: fx.Node):
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return
    for i, arg in enumerate(schema.arguments):
        if str(arg.type) not in _SIZE_TYPES:
            continue
        if i < len(node.args):
            yield arg.name, node.args[i]
        elif arg.name in node.kwargs:
            yield arg.name, node.kwargs[arg.name]


def _fake(mode: FakeTensorMode, value):
    return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))
