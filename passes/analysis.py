"""Analysis: what the captured graph *is* — attention, encoder blocks, residual stream, prefix
tokens and decoder taps. Nothing here changes the graph.

The rules are structural, with no model-family code paths:

- **attention** is a ``scaled_dot_product_attention`` node, or a ``softmax`` over the last axis
  whose input comes from a matmul (q kᵀ, through scaling, bias and casts) and whose output is the
  left operand of a matmul (with v, through dropout and casts);
- an **encoder block** is a pre-norm residual pair around one attention: ``h = x + f(x)`` where
  the branch ``f`` holds the attention, then ``y = h + g(h)`` where ``g`` holds no attention;
- the **encoder** is the one chain of such blocks (each block's input is the previous block's
  output) that does not read the output of another chain: attention blocks of a decoder that runs
  on encoder features (Segmenter's mask transformer) form a later chain and are never touched;
- **prefix tokens** are the leading tokens of the encoder input that do not depend on the image
  (CLS, distillation, registers), found by running the embedding on two different inputs;
- a **decoder tap** is every use of a residual-stream node outside the encoder blocks (the final
  norm, a DPT/UPerNet decoder reading intermediate blocks, the graph output).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from mpm_fx.errors import EncoderNotFound, NoAttentionFound, UnsupportedGraph
from mpm_fx.passes.graph import (
    SDPA,
    NodeOrder,
    is_sdpa,
    module_path,
    sdpa_args,
    shape_of,
    values_of,
)

__all__ = ["Analysis", "Block", "Tap", "KeyProjection", "analyse", "find_attention", "leaks",
           "attention_keys", "key_projection",
           "skipped_attention", "describe_encoder", "position_tensors", "derived_from_state",
           "merge_room", "block_ranges", "blocks_with_the_same_op", "POSITION_READERS"]

aten = torch.ops.aten
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}
ADD = {aten.add.Tensor}
# Ops allowed between q kᵀ and the softmax, and between the softmax and the matmul with v.
_SCORE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor,
              aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
              aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.clone.default,
              aten.contiguous.default, aten.dropout.default,
              aten.alias.default, aten.detach.default,
              aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SEARCH_DEPTH = 8


@dataclass(frozen=True)
class Block:
    """One encoder block: ``output = h + mlp(h)``, ``h = input + attention-branch(input)``."""

    index: int
    input: fx.Node
    output: fx.Node
    attention: fx.Node
    kind: str  # "sdpa" or "softmax"
    body: frozenset = field(repr=False)  # nodes computed from input that output needs (output in)
    middle: fx.Node | None = field(default=None, repr=False)  # h = input + attention branch

    @property
    def name(self) -> str:
        return module_path(self.attention)

    @property
    def module(self) -> str:
        """Path of the innermost module holding the whole block ("" if none does)."""
        stacks = [[path for path, _ in n.meta["nn_module_stack"].values()]
                  for n in self.body if n.meta.get("nn_module_stack")]
        common = []
        for paths in zip(*stacks):
            if len(set(paths)) > 1:
                break
            common.append(paths[0])
        return common[-1] if common else ""


@dataclass(frozen=True)
class Tap:
    """Encoder tokens leaving the encoder: ``users`` read ``stream[depth]`` (the input of block
    ``depth``; depth == number of blocks is the encoder output)."""

    depth: int
    users: tuple


@dataclass(frozen=True)
class Join:
    """Tokens that do not come from the image (learned queries) concatenated to the encoder's
    output: the encoder ends there, and the blocks after it are the decoder's."""

    depth: int  # the stream depth they join at (after block depth - 1)
    node: fx.Node  # the concatenation
    tokens: int  # how many join
    where: str  # "in front" or "at the end"
    source: str  # "file.py:line" of the model's code

    def __str__(self) -> str:
        return (f"{self.tokens} learned tokens join the stream {self.where} after block "
                f"{self.depth - 1} ({self.source}, {self.node.name})")


@dataclass(frozen=True)
class Analysis:
    """What the captured graph is, found once before any rewrite and never changed: the
    encoder's blocks, its residual stream (``stream[j]`` is the input of block j, ``stream[-1]``
    the last block's output), the decoder taps, and the token layout at the encoder input.
    Passes change the graph around these nodes, never the nodes' identity (a pass that changes
    an analysed node, like size-aware attention, edits it in place)."""

    blocks: tuple
    stream: tuple
    taps: tuple
    batch: int  # B of the captured shapes
    tokens: int  # P + N at the encoder input
    prefix_tokens: int  # P: leading tokens that do not depend on the image
    order: NodeOrder = field(compare=False, repr=False)  # of the graph as captured
    images: tuple = ()  # the placeholders that carry the image (not parameters as inputs)
    grid: tuple | None = None  # (rows, cols) of the image tokens, where they come from a grid
    joins: tuple = ()  # Join: learned tokens concatenated to the encoder's output

    @property
    def image_tokens(self) -> int:
        return self.tokens - self.prefix_tokens


def analyse(gm: fx.GraphModule, flat_inputs: list, image_inputs=None) -> Analysis:
    """The whole analysis of a captured graph: encoder, taps, prefix tokens. Raises an
    ``MPMError`` naming the cause when there is no encoder with at least two image tokens.

    image_inputs: flat input positions that carry the image (default: every tensor input)."""
    blocks, stream, taps, order = _find_encoder(gm)
    batch, tokens = shape_of(stream[0])[:2]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    images = tuple(placeholders[i] for i in image_inputs) if image_inputs is not None else tuple(
        n for n, value in zip(placeholders, flat_inputs) if isinstance(value, torch.Tensor))
    analysis = Analysis(blocks, stream, taps, batch, tokens, 0, order, images)
    if batch == 0:  # a batch of no images: nothing to vary, nothing to merge
        return analysis
    prefix = _find_prefix_tokens(gm, analysis, flat_inputs, image_inputs)
    grid = _find_grid(order, stream[0], tokens - prefix)
    joins = _find_joins(taps, stream, order, images)
    analysis = Analysis(blocks, stream, taps, batch, tokens, prefix, order, images, grid, joins)
    _check_image_tokens(gm, analysis, flat_inputs)
    return analysis


def _find_joins(taps, stream: tuple, order: NodeOrder, images: tuple) -> tuple:
    """Taps that concatenate tokens not computed from the images (learned queries) to the
    stream along the token dim: where the decoder's tokens join."""
    joins = []
    for tap in taps:
        for user in tap.users:
            if user.op != "call_function" or user.target is not aten.cat.default:
                continue
            parts, dim = user.args[0], user.args[1] if len(user.args) > 1 else 0
            if dim % 3 != 1 or not all(isinstance(p, fx.Node) for p in parts):
                continue
            stream_at = [i for i, p in enumerate(parts) if p is stream[tap.depth]]
            others = [p for p in parts if p is not stream[tap.depth]]
            if len(stream_at) != 1 or not others or any(
                    order.depends(p, image) for p in others for image in images):
                continue
            count = sum(shape_of(p)[1] for p in others)
            where = "in front" if stream_at[0] == len(parts) - 1 else (
                "at the end" if stream_at[0] == 0 else "around the stream")
            joins.append(Join(tap.depth, user, count, where, _line_of(user)))
    return tuple(joins)


def _line_of(node: fx.Node) -> str:
    import re

    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    return f"{frames[-1][0].rsplit('/', 1)[-1]}:{frames[-1][1]}" if frames else module_path(node)


def _find_grid(order: NodeOrder, start: fx.Node, image_tokens: int):
    """(rows, cols) of the image tokens: the last 4-D tensor the encoder input is computed from
    that holds them as a grid, (B, C, rows, cols) (a patch convolution's output) or
    (B, rows, cols, C), flattened in raster order; else a square grid when the count is a
    square; else None (a method that needs positions then asks for grid=)."""
    for node in reversed(order.nodes[:order.index[start]]):
        shape = shape_of(node)
        if len(shape) == 4 and order.depends(start, node):
            if shape[2] * shape[3] == image_tokens and shape[2] > 1 < shape[3]:
                return shape[2], shape[3]
            if shape[1] * shape[2] == image_tokens and shape[1] > 1 < shape[2]:
                return shape[1], shape[2]
    side = int(round(image_tokens ** 0.5))
    return (side, side) if side * side == image_tokens else None


def find_attention(graph: fx.Graph) -> list:
    """[(node, kind)] in graph order: every SDPA node and every softmax(q kᵀ) v pattern."""
    found = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is SDPA:
            found.append((n, "sdpa"))
        elif n.target in SOFTMAX and _is_attention_softmax(n):
            found.append((n, "softmax"))
    return found


def _is_attention_softmax(softmax: fx.Node) -> bool:
    scores = softmax.args[0]
    dim = softmax.args[1]
    ndim = len(shape_of(scores))
    if ndim < 3 or dim not in (-1, ndim - 1):
        return False
    return _reaches(scores, up=True) and _reaches(softmax, up=False)


def _reaches(node: fx.Node, *, up: bool) -> bool:
    """Whether a matmul is within a few score ops of ``node`` (upwards: feeding it; downwards:
    taking it as the left operand)."""
    frontier = [node]
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for n in frontier:
            if up:
                if n.op == "call_function" and n.target in MATMUL:
                    return True
                if n.op == "call_function" and (n.target in _SCORE_OPS or n is node):
                    nxt += [a for a in n.args if isinstance(a, fx.Node)]
            else:
                for u in n.users:
                    if u.target in MATMUL and _left_operand(u) is n:
                        return True
                    if u.target in _SCORE_OPS:
                        nxt.append(u)
        frontier = nxt
    return False


def attention_keys(block: Block) -> tuple:
    """(node, transposed) holding the keys of a block's attention: SDPA's ``key`` (*L, T, E), or
    the right operand of the q kᵀ matmul of an explicit softmax, (*L, E, T) (``transposed``)."""
    if is_sdpa(block.attention):
        return sdpa_args(block.attention)["key"], False
    frontier = [block.attention.args[0]]
    for _ in range(_SEARCH_DEPTH):
        nxt = []
        for n in frontier:
            if n.op == "call_function" and n.target in MATMUL:
                return (n.args[2] if n.target is aten.baddbmm.default else n.args[1]), True
            if n.op == "call_function" and (n.target in _SCORE_OPS or n is block.attention):
                nxt += [a for a in n.args if isinstance(a, fx.Node)]
        frontier = nxt
    raise UnsupportedGraph(f"{module_path(block.attention)}: the q kᵀ product of this attention "
                           "was not found, so its keys cannot be the merge's metric; merge "
                           "before the block (placement='before_block')")


# Ops that only move a projection's channels and tokens about (no arithmetic), and the scalar
# multiples a key may get (a positive scale leaves every cosine as it is).
_INDEX_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
              aten.permute.default, aten.transpose.int, aten.t.default, aten.select.int,
              aten.slice.Tensor, aten.unbind.int, aten.split.Tensor,
              aten.split_with_sizes.default, aten.chunk.default, aten.unflatten.int,
              aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default,
              aten.contiguous.default, aten.alias.default, aten.detach.default,
              operator.getitem}
_SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


@dataclass(frozen=True)
class KeyProjection:
    """How a block's attention gets its keys from the block's input, for a merge before the
    block on the keys (``metric="keys"``): ``keys = linear(norm(input), weight, bias)`` with
    the rows ``start:stop`` of weight and bias (a fused q/k/v projection's k rows, or all of a
    key projection's), then only reshapes, permutes and selections. ``norm`` holds the
    block's nodes from its input to the projection's input, in graph order (its input norm),
    to run again on the unmerged tokens."""

    norm: tuple
    weight: fx.Node
    bias: fx.Node | None
    start: int
    stop: int


def key_projection(block: Block) -> KeyProjection:
    """The key projection of a block's attention, followed back from its keys (see
    ``KeyProjection``). Raises UnsupportedGraph naming the fix when the keys are more than a
    linear projection of the block's input moved about (rotary embeddings, a key norm)."""
    keys, transposed = attention_keys(block)
    chain, node = [], keys
    while node.op == "call_function" and node.target is not aten.linear.default:
        tensors = node.all_input_nodes
        if node.target in _SCALE_OPS and len(tensors) == 1 and _positive_scalar(node):
            pass  # a positive scale: every cosine as it was
        elif node.target not in _INDEX_OPS or len(tensors) != 1:
            raise UnsupportedGraph(
                f"{block.name}: its keys are not a linear projection of the block's input "
                f"moved about ({_line_of(node)} on the way), so metric='keys' cannot compute "
                "them before the block; merge between attention and MLP "
                "(placement='after_attention'), where the keys are the attention's own")
        chain.append(node)
        node = tensors[0]
    if node.op != "call_function" or node not in block.body:
        raise UnsupportedGraph(f"{block.name}: no linear key projection inside the block was "
                               "found, so metric='keys' cannot compute the keys before the "
                               "block; use placement='after_attention'")
    linear, rows = node, _key_rows(node, chain[::-1], keys, transposed)
    z = linear.args[0]
    norm = _between(block, z)
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return KeyProjection(norm, linear.args[1], bias, rows.start, rows.stop)


def _positive_scalar(node: fx.Node) -> bool:
    scalars = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return len(scalars) == 1 and scalars[0] > 0


def _key_rows(linear: fx.Node, chain: list, keys: fx.Node, transposed: bool) -> range:
    """The projection's output rows the keys hold, found by running ``chain`` on tensors that
    number the images, the tokens and the rows of the projection's output (expanded views: no
    copy of its size): each image's key of a token must come from that image and token, from
    the same rows for every token (one range)."""
    if len(shape_of(linear)) != 3:
        raise UnsupportedGraph(f"the key projection {_line_of(linear)} is not (batch, tokens, "
                               "channels); use placement='after_attention'")
    B, T, F = shape_of(linear)

    def follow(numbers: Tensor) -> Tensor:  # numbers (B, T, F) -> the keys' (B, L, T, E)
        env = {linear: numbers}
        for n in chain:
            if n.target in _SCALE_OPS:
                env[n] = env[n.all_input_nodes[0]]
                continue
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
        out = env[keys].transpose(-2, -1) if transposed else env[keys]
        return out.reshape(B, -1, T, out.shape[-1])  # batch-major, as key_metric reads it

    def numbered(size: int, dim: int) -> Tensor:
        shape = [1, 1, 1]
        shape[dim] = size
        return torch.arange(size).view(shape).expand(B, T, F)

    try:
        image, token, row = follow(numbered(B, 0)), follow(numbered(T, 1)), follow(numbered(F, 2))
    except Exception as error:  # sizes that do not fit: keys that are not one projection's rows
        raise UnsupportedGraph(f"the keys of {_line_of(keys)} could not be followed back to "
                               f"their projection's rows ({error}); use "
                               "placement='after_attention'") from error
    rows = row[0, :, 0].flatten().unique()
    ok = (torch.equal(image, torch.arange(B).view(B, 1, 1, 1).expand_as(image))
          and torch.equal(token, torch.arange(T).view(1, 1, T, 1).expand_as(token))
          and torch.equal(row, row[:1, :, :1].expand_as(row))
          and rows.numel() == row[0, :, 0].numel() == int(rows[-1] - rows[0]) + 1)
    if not ok:
        raise UnsupportedGraph(f"the keys of {_line_of(keys)} are not whole rows of one linear "
                               "projection per token; use placement='after_attention'")
    return range(int(rows[0]), int(rows[-1]) + 1)


def _between(block: Block, z: fx.Node) -> tuple:
    """The block's nodes from its input to ``z`` (z included, the input not), in graph order."""
    seen, todo = set(), [z]
    while todo:
        n = todo.pop()
        if n is block.input or n in seen or n not in block.body:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return tuple(n for n in block.input.graph.nodes if n in seen)


def _left_operand(matmul: fx.Node):
    return matmul.args[1] if matmul.target is aten.baddbmm.default else matmul.args[0]


def _find_encoder(gm: fx.GraphModule) -> tuple:
    """The encoder's blocks, residual stream and decoder taps (tuples), and the NodeOrder."""
    order = NodeOrder(gm.graph)
    attention = find_attention(gm.graph)
    if not attention:
        raise NoAttentionFound(
            "the traced graph has no softmax(q kᵀ) v and no scaled_dot_product_attention: "
            "mpm_fx merges tokens before transformer blocks, so it needs a ViT-style encoder. "
            "If the model computes attention some other way (e.g. a fused custom kernel), "
            "switch it to F.scaled_dot_product_attention for export.")
    around = [(a, _block_around(order, a, kind)) for a, kind in attention]
    blocks = [b for _, b in around if isinstance(b, Block)]
    if not blocks:
        reasons = {}
        for a, why in around:
            reasons.setdefault(why, []).append(module_path(a))
        detail = "; ".join(f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}: {why}"
                           for why, names in reasons.items())
        raise EncoderNotFound(
            f"found attention but no encoder block around it ({detail}). mpm_fx merges the "
            "(batch, tokens, channels) residual stream of pre-norm blocks: x + attn(norm(x)), "
            "then h + mlp(norm(h)).")
    _refuse_parallel_attention(blocks)
    chains = _chains(blocks)
    first = [c for c in chains
             if not any(order.depends(c[0].input, b.output) for o in chains if o is not c for b in o)]
    if len(first) != 1:
        raise EncoderNotFound(
            f"found {len(chains)} chains of transformer blocks and cannot tell which one is the "
            f"encoder (starting at {[module_path(c[0].attention) for c in first]}): the encoder "
            "must be the one chain that does not read another chain's output."
            + _skipped_text(gm, [b.attention for c in chains for b in c]))
    chain = first[0]
    stream = (chain[0].input,) + tuple(b.output for b in chain)
    blocks = tuple(Block(j, b.input, b.output, b.attention, b.kind,
                         order.between(b.input, b.output), b.middle) for j, b in enumerate(chain))
    shape = shape_of(stream[0])
    if len(shape) != 3:
        raise UnsupportedGraph(
            f"the encoder's residual stream has shape {tuple(shape)}; mpm_fx needs (batch, tokens, "
            "channels) tokens at block inputs.")
    return blocks, stream, tuple(_decoder_taps(blocks, stream)), order


def _block_around(order: NodeOrder, attention: fx.Node, kind: str):
    """The (input, output) residual pair around one attention node, or the reason there is
    none (a string)."""
    start = order.index[attention]
    attn_add = None
    for n in order.nodes[start + 1:]:
        if n.target in ADD and order.depends(n, attention):
            skip = _residual_operand(order, n, attention)
            if skip is not None and order.depends(attention, skip):
                attn_add = (skip, n)
                break
    if attn_add is None:
        return "no residual add x + f(x) around it (post-norm blocks are not supported)"
    block_input, h = attn_add
    if len(shape_of(block_input)) != 3:
        return (f"its residual stream has shape {shape_of(block_input)}, not (batch, tokens, "
                "channels): windowed attention on a (B, H, W, C) stream (SAM-style) is not "
                "supported")
    for n in order.nodes[order.index[h] + 1:]:
        if n.target in ADD and h in n.args[:2]:
            branch = n.args[1] if n.args[0] is h else n.args[0]
            if not isinstance(branch, fx.Node) or not order.depends(branch, h):
                continue
            if _has_attention_between(order, h, branch):
                return "the next residual branch holds another attention (not an MLP)"
            if shape_of(n) != shape_of(block_input):
                return f"the block changes the stream's shape from {shape_of(block_input)}"
            return Block(-1, block_input, n, attention, kind, frozenset(), h)
    return ("no second residual add h + mlp(h) reads its output h directly (a block that "
            "reshapes its stream between the two residual adds, e.g. windowed attention)")


def _refuse_parallel_attention(blocks: list) -> None:
    """Two attentions on one residual pair: a parallel block (ViT-22B style)."""
    seen = {}
    for b in blocks:
        seen.setdefault((b.input, b.output), []).append(b)
    for group in seen.values():
        if len(group) > 1:
            names = ", ".join(module_path(b.attention) for b in group)
            raise UnsupportedGraph(
                f"one encoder block runs {len(group)} attentions in parallel on the same "
                f"residual stream ({names}): parallel blocks are not supported; mpm_fx merges "
                "before blocks that hold one attention each.")


def _residual_operand(order: NodeOrder, add: fx.Node, attention: fx.Node):
    """For ``add(a, b)`` where one operand holds the attention branch, the other (the skip)."""
    a, b = add.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if order.depends(b, attention) and not order.depends(a, attention):
        skip = a
    elif order.depends(a, attention) and not order.depends(b, attention):
        skip = b
    else:
        return None
    return skip if shape_of(skip) == shape_of(add) else None


def _has_attention_between(order: NodeOrder, first: fx.Node, last: fx.Node) -> bool:
    return any(is_sdpa(n) or n.target in SOFTMAX for n in order.between(first, last))


def _chains(blocks: list) -> list:
    by_input = {}
    for b in blocks:
        by_input.setdefault(b.input, b)
    outputs = {b.output for b in blocks}
    chains = []
    for b in blocks:
        if b.input in outputs:
            continue  # not the start of a chain
        chain = [b]
        while chain[-1].output in by_input:
            chain.append(by_input[chain[-1].output])
        chains.append(chain)
    return chains


def _decoder_taps(blocks: list, stream: list) -> list:
    taps = []
    for depth, node in enumerate(stream):
        inside = blocks[depth].body if depth < len(blocks) else frozenset()
        users = tuple(u for u in node.users if u not in inside)
        if users:
            taps.append(Tap(depth, users))
    return taps


def leaks(block: Block) -> list:
    """Values computed inside a block (other than its output) that are read outside it. Readers
    whose result nobody uses (export's dtype assertions) do not count."""
    return [(n, u) for n in block.body if n is not block.output
            for u in n.users if u not in block.body and (u.users or u.op == "output")]


def skipped_attention(gm: fx.GraphModule, used: list) -> list:
    """Attention-like ops that are not part of the encoder: recognised attention outside the
    ``used`` nodes, and softmaxes not recognised as attention (e.g. heads mixed between
    q kᵀ and the softmax). Module paths, in graph order, each once."""
    found = {a for a, _ in find_attention(gm.graph)}
    used = set(used)
    names = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n in used:
            continue
        if n in found:
            names.append(f"{module_path(n)} (attention outside the encoder found)")
        elif n.target in SOFTMAX:
            names.append(f"{module_path(n)} (softmax not recognised as attention)")
    return list(dict.fromkeys(names))


def _skipped_text(gm: fx.GraphModule, used: list) -> str:
    skipped = skipped_attention(gm, used)
    if not skipped:
        return ""
    more = f", and {len(skipped) - 4} more" if len(skipped) > 4 else ""
    return f" Attention-like ops left out: {', '.join(skipped[:4])}{more}."


def describe_encoder(gm: fx.GraphModule, encoder: Analysis) -> str:
    """One sentence on the encoder found, and what was left out, for errors."""
    names = [module_path(b.attention) for b in encoder.blocks]
    listed = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]}"
    return (f"the encoder found has {len(encoder.blocks)} blocks ({listed}) on "
            f"{encoder.tokens} tokens, {encoder.prefix_tokens} of them prefix tokens."
            + _skipped_text(gm, [b.attention for b in encoder.blocks]))


def merge_room(blocks: list, depth: int, what: str = "do so") -> str:
    """Where merges can still go when ``blocks`` (sorted indices) cannot run on merged tokens:
    only before blocks after the last of them."""
    listed = block_ranges(blocks)
    if blocks[-1] == depth - 1:
        return f"blocks {listed} {what}, the last block among them, so no schedule can merge this model"
    return (f"blocks {listed} {what}: schedule merges only before blocks "
            f"{blocks[-1] + 1}..{depth - 1}")


def block_ranges(indices: list) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs = []
    for k in indices:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def blocks_with_the_same_op(encoder: Analysis, node: fx.Node) -> list:
    """Indices of the encoder blocks holding an op like ``node`` (same target, same place
    inside the block's module), in order; [] when ``node`` is in no block."""
    path = module_path(node)
    own = next((b for b in encoder.blocks if node in b.body), None)
    if own is None or not own.module or not path.startswith(own.module):
        return []
    inside = path[len(own.module):]
    return [b.index for b in encoder.blocks
            if any(n.target is node.target and module_path(n) == b.module + inside for n in b.body)]


# Elementwise ops through which a token-indexed table meets the tokens (and is gathered for them).
POSITION_READERS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                    aten.masked_fill.Tensor, aten.masked_fill.Scalar, aten.where.self}


def position_tensors(encoder: Analysis) -> dict:
    """Per encoder block: [(reader, tensor)] for tensors read inside the block that are indexed
    by token position but do not come from its tokens: an attention mask or a relative-position
    bias (an SDPA ``attn_mask``, or added to the scores) or a rotary table (multiplied into q
    or k). A tensor counts when one of its dims has the token count (P + N, or the N image
    tokens) and lines up, right-aligned, with a dim of that size of the token-carrying operand.
    """
    sizes = {encoder.tokens, encoder.image_tokens} - {0, 1}
    found = {}
    for block in encoder.blocks:
        for reader in sorted(block.body, key=encoder.order.index.__getitem__):
            if reader.op != "call_function":
                continue
            inputs = reader.all_input_nodes
            carried = [a for a in inputs if a is block.input or a in block.body]
            for arg in inputs:
                if arg in carried or not sizes & set(shape_of(arg)):
                    continue
                if is_sdpa(reader) and sdpa_args(reader).get("attn_mask") is arg:
                    found.setdefault(block.index, []).append((reader, arg))
                elif reader.target in POSITION_READERS and any(
                        _aligned_token_dim(shape_of(arg), shape_of(c), sizes) for c in carried):
                    found.setdefault(block.index, []).append((reader, arg))
    return found


def _aligned_token_dim(a: tuple, b: tuple, sizes: set) -> bool:
    return any(x == y and x in sizes for x, y in zip(reversed(a), reversed(b)))


def derived_from_state(gm: fx.GraphModule, order: NodeOrder, node: fx.Node) -> list:
    """The parameters and buffers of ``gm`` that ``node`` is computed from (their names):
    values the user may change after capture, unlike constants made while tracing."""
    state = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    return [n.target for n in order.nodes
            if n.op == "get_attr" and n.target in state and order.depends(node, n)]


def _find_prefix_tokens(gm: fx.GraphModule, encoder: Analysis, flat_inputs: list,
                        image_inputs=None) -> int:
    """Number of leading encoder-input tokens that do not depend on the model's inputs.

    Runs the graph up to the encoder input twice, once with the example inputs and once with
    the image inputs (positions ``image_inputs``, default every tensor input) changed:
    floating-point tensors drawn anew, integer tensors (e.g. a uint8 image) with their values
    shuffled, so that any index they hold stays valid. Tokens that come out equal do not
    depend on the image. They must form a prefix (CLS, distillation, registers in front)."""
    if image_inputs is None:
        image_inputs = [i for i, t in enumerate(flat_inputs) if isinstance(t, torch.Tensor)]
    start = encoder.stream[0]
    first = values_of(gm, flat_inputs, [start])[start]
    generator = torch.Generator().manual_seed(0)
    other = [_perturbed(t, generator) if i in image_inputs else t
             for i, t in enumerate(flat_inputs)]
    second = values_of(gm, other, [start])[start]
    same = (first == second).flatten(2).all(-1).all(0)  # (T,) True where no input reaches
    T = same.numel()
    prefix = int(same.int().cumprod(0).sum())
    if bool(same[prefix:].any()):
        where = same[prefix:].nonzero().flatten()[:5].add(prefix).tolist()
        raise UnsupportedGraph(
            f"tokens {where} of the encoder input do not depend on the image but are not in front "
            f"of the image tokens (the first {prefix} of {T} are). MPM keeps prefix tokens "
            "(CLS, registers) unmerged only when they come first.")
    return prefix


def _perturbed(t, generator: torch.Generator):
    """Another value for an input tensor: floats drawn anew, integers shuffled among their own
    values (a shuffled uint8 image is another image; an index stays a valid index)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.dtype == torch.bool:
        return t
    if t.is_floating_point() or t.is_complex():
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        return (noise * 3 + 1).to(device=t.device, dtype=t.dtype)
    order = torch.randperm(t.numel(), generator=generator).to(t.device)
    return t.flatten()[order].reshape(t.shape)


def _check_image_tokens(gm: fx.GraphModule, encoder: Analysis, flat_inputs: list) -> None:
    """An encoder with fewer than 2 image tokens merges nothing: a wrong encoder, or image
    inputs the prefix detection could not vary. Never a silent no-op."""
    if encoder.image_tokens >= 2:
        return
    constant = [i for i, t in enumerate(flat_inputs) if isinstance(t, torch.Tensor)
                and not t.is_floating_point() and (t.dtype == torch.bool or t.numel() < 2
                                                   or bool((t == t.flatten()[0]).all()))]
    hint = (f" Inputs {constant} could not be varied (bool, or one repeated value): if the "
            "image is one of them, pass a real image." if constant else "")
    raise EncoderNotFound(
        f"nothing to merge: {describe_encoder(gm, encoder)} Only {encoder.image_tokens} of its "
        "tokens depend on the image. Likely causes: the model's own self-attention was not "
        "recognised (see the ops left out) and a later attention over a few tokens was taken "
        "for the encoder (e.g. class-attention, CaiT-style); or the image did not reach the "
        f"tokens.{hint}")
