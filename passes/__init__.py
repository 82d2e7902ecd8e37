"""Graph passes of mpm_fx (installed as ``mpm_fx.passes``).

The pipeline, in order (one pass per module, analysis apart from rewriting):

    capture              torch.export(strict=False) -> flat ATen FX graph     capture.py
    find_encoder         attention, blocks, residual stream, decoder taps     analysis.py
    find_prefix_tokens   leading tokens that do not depend on the image       analysis.py
    check the image tokens (>= 2) and the schedule against the blocks found
    drop_noop_masks      no-op masks dropped, position-indexed tensors refused drop_noop_masks.py
    insert_merges        merge before each scheduled block, maps composed     insert_merges.py
    insert_reconstructions  one gather before every decoder tap               insert_reconstructions.py
    mask_padded_keys     batch > 1: later attentions ignore padding           mask_padded_keys.py
    size_aware_attention option: log(size) on later logits, flash kept       size_aware_attention.py
    follow_token_count   static sizes after a merge become symbolic           follow_token_count.py
    record token counts  one extra (merges, B) output for the report

``rewrite`` runs it and returns a ``Program``: the rewritten GraphModule and what was found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from mpm_fx.errors import EncoderNotFound, ScheduleError, UnsupportedGraph
from mpm_fx.passes.analysis import (Encoder, describe_encoder, find_encoder, find_prefix_tokens,
                                   leaks, module_path)
from mpm_fx.passes.capture import capture, dynamo_image_inputs
from mpm_fx.passes.drop_noop_masks import drop_noop_masks
from mpm_fx.passes.follow_token_count import follow_token_count
from mpm_fx.passes.insert_merges import Merges, insert_merges
from mpm_fx.passes.insert_reconstructions import insert_reconstructions
from mpm_fx.passes.mask_padded_keys import mask_padded_keys
from mpm_fx.passes.size_aware_attention import size_aware_attention

__all__ = ["Program", "rewrite", "rewrite_dynamo_graph"]


@dataclass
class Program:
    """One captured-and-rewritten model, valid for inputs of the captured shapes."""

    gm: fx.GraphModule  # flat leaves in; flat outputs, then the (merges, B) token counts, out
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    encoder: Encoder
    schedule: tuple
    reconstructed: tuple  # depths of the taps that read merged tokens and got a gather
    masked_attentions: int
    symbolic_sizes: int
    size_aware: int = 0  # attentions given log(size) (option size_aware)


def rewrite(model: nn.Module, args: tuple, kwargs: dict, schedule: tuple, *,
            size_aware: bool = False, image_inputs=None, token_counts: bool = True) -> Program:
    """Capture ``model`` at these inputs and apply the pipeline.

    image_inputs:  flat input positions that carry the image (default: every tensor input);
                   backends pass them when parameters arrive as graph inputs.
    size_aware:    add log(token size) to the logits of every attention after a merge.
    token_counts:  append the (merges, B) token-count output that ``mpm_report`` reads.
    """
    captured = capture(model, args, kwargs)
    gm = captured.gm
    flat_inputs = pytree.tree_leaves((args, kwargs))
    encoder, order = find_encoder(gm)
    if encoder.batch:  # a batch of no images has nothing to merge: the model's own graph
        encoder.prefix_tokens = find_prefix_tokens(gm, encoder, flat_inputs, image_inputs)
        check_image_tokens(gm, encoder, flat_inputs)
    check_schedule_range(gm, schedule, encoder)
    merges, rebuilt, masked, symbolic, sized = Merges(), (), 0, 0, 0
    if schedule and encoder.batch:
        first = min(schedule)
        _check_no_leaks(encoder, first)
        drop_noop_masks(gm, encoder, order, first, flat_inputs)
        merges = insert_merges(gm, encoder, schedule)
        rebuilt = insert_reconstructions(gm, encoder, merges)
        masked = mask_padded_keys(gm, encoder, merges)
        if size_aware:
            sized = size_aware_attention(gm, encoder, merges)
        symbolic = follow_token_count(gm, encoder, merges, flat_inputs)
    if token_counts:
        _output_token_counts(gm, encoder, merges)
    gm.graph.lint()
    gm.recompile()
    return Program(gm, captured.in_spec, captured.out_spec, encoder, tuple(sorted(schedule)),
                   rebuilt, masked, symbolic, sized)


def rewrite_dynamo_graph(gm: fx.GraphModule, example_inputs: list, schedule: tuple, *,
                         size_aware: bool = False) -> Program:
    """The pipeline on the graph a ``torch.compile`` backend receives (parameters as inputs);
    the result takes and returns the same flat lists as ``gm``."""
    return rewrite(gm, tuple(example_inputs), {}, schedule, size_aware=size_aware,
                   image_inputs=dynamo_image_inputs(gm), token_counts=False)


def check_image_tokens(gm: fx.GraphModule, encoder: Encoder, flat_inputs: list) -> None:
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


def check_schedule_range(gm: fx.GraphModule, schedule: tuple, encoder: Encoder) -> None:
    L = len(encoder.blocks)
    for k in schedule:
        if k >= L:
            raise ScheduleError(f"block {k} is out of range: the encoder has {L} blocks "
                                f"(0..{L - 1}); the schedule holds 0-based block indices. "
                                f"{describe_encoder(gm, encoder)}")


def _check_no_leaks(encoder: Encoder, first: int) -> None:
    for block in encoder.blocks[first:]:
        for inner, reader in leaks(block):
            raise UnsupportedGraph(
                f"{module_path(reader)} ({reader.name}) reads {inner.name}, a value inside "
                f"encoder block {block.index} ({block.name}) other than its output (e.g. "
                "attention weights). After a merge such values have fewer tokens and no "
                f"reconstruction; schedule merges after block {block.index} or stop returning it.")


def _output_token_counts(gm: fx.GraphModule, encoder: Encoder, merges: Merges) -> None:
    """Append a (merges, B) int64 tensor of per-image token counts after each merge (image
    tokens, prefix excluded) to the graph outputs."""
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        if merges.points:
            sums = [graph.call_function(torch.ops.aten.sum.dim_IntList, (p.valid, [1]))
                    for p in merges.points]
            counts = graph.call_function(torch.ops.aten.stack.default, (sums,))
        else:
            counts = graph.call_function(torch.ops.aten.new_zeros.default,
                                         (encoder.stream[0], [0, encoder.batch]),
                                         {"dtype": torch.long})
    output.args = (tuple(output.args[0]) + (counts,),)
