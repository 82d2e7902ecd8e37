"""Graph passes of mpm_fx (installed as ``mpm_fx.passes``).

A captured model goes through: ``capture`` (torch.export -> a flat ATen FX graph), ``analyse``
(what the graph is: encoder blocks, residual stream, decoder taps, prefix tokens; frozen), then
``PIPELINE``, one pass per module, each ``pass(gm, ctx: PassContext) -> gm``. A pass reads the
analysis and what earlier passes recorded in ``ctx``, counts what it did in ``ctx.stats``, and
does nothing when its option is off. ``print(mpm_fx.passes.PIPELINE)`` gives the order.

``rewrite`` runs all of it and returns a ``Program``: the rewritten GraphModule and the context.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from torch import fx, nn
from torch.utils import _pytree as pytree

from mpm_fx.methods import Merging, merging
from mpm_fx.passes.analysis import Analysis, analyse
from mpm_fx.passes.attend_per_image import attend_per_image
from mpm_fx.passes.capture import capture, dynamo_image_inputs
from mpm_fx.passes.check_schedule import check_schedule
from mpm_fx.passes.context import Merges, PassContext
from mpm_fx.passes.drop_noop_masks import drop_noop_masks
from mpm_fx.passes.follow_token_count import follow_token_count
from mpm_fx.passes.insert_merges import insert_merges
from mpm_fx.passes.insert_reconstructions import insert_reconstructions
from mpm_fx.passes.mask_padded_keys import mask_padded_keys
from mpm_fx.passes.output_encoder import output_encoder
from mpm_fx.passes.output_token_counts import output_token_counts
from mpm_fx.passes.size_aware_attention import size_aware_attention

__all__ = ["PIPELINE", "Program", "PassContext", "Analysis", "Merges", "rewrite",
           "rewrite_dynamo_graph", "run_pipeline", "with_signature", "portable"]

log = logging.getLogger("mpm_fx")


class Pipeline(tuple):
    """The passes in order; printed as the chain a reader follows."""

    def __repr__(self) -> str:
        return " -> ".join(["capture", "analyse"] + [p.__name__ for p in self])


PIPELINE = Pipeline((
    check_schedule,          # indices in range; nothing leaks out of a merged block
    drop_noop_masks,         # no-op masks dropped; masks from the images refused
    insert_merges,           # the method's merge at each scheduled block, maps composed
    insert_reconstructions,  # one gather before every decoder tap after a merge
    output_encoder,          # option encoder_outputs: rebuilt encoder tokens and maps out
    follow_token_count,      # static sizes after a merge become symbolic; position tables
                             # (rotary, relative bias) gathered by the merged tokens' leaders
    attend_per_image,        # batch > 1, attention="varlen": each image's SDPA on its own keys
    mask_padded_keys,        # batch > 1: later attentions ignore padding rows (a key mask)
    size_aware_attention,    # option size_aware: log(size) on later logits, flash kept
    output_token_counts,     # option token_counts: the (merges, B) counts out, for the report
))


@dataclass
class Program:
    """One captured-and-rewritten model, valid for inputs of the captured shapes.

    ``gm`` takes the flat input leaves and returns the model's flat outputs, then the extra
    outputs of the options (``extras`` names them, in order)."""

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    context: PassContext
    schedule: tuple  # as requested (ctx.schedule is () for a batch of no images)
    specialized: tuple = ()  # capture.Specialization: branches specialised on the model's values

    @property
    def extras(self) -> tuple:
        ctx = self.context
        maps = tuple(f"map_{p.block}" for p in ctx.merges.points)
        return ((("encoder_tokens",) + maps if ctx.encoder_outputs else ())
                + (("token_counts",) if ctx.token_counts else ()))

    def as_module(self, flat_outputs: bool = False) -> fx.GraphModule:
        """``gm`` with the model's own call signature (``(args, kwargs)`` in, the model's
        outputs out), e.g. for ``torch.export``; only for a program without extra outputs.
        ``flat_outputs``: a tuple of the output leaves instead (pytree order), for a package
        that must run where the model's output classes cannot be rebuilt."""
        if self.extras:
            raise ValueError(f"a program with extra outputs {self.extras} has no model signature;"
                             " rewrite it with token_counts=False")
        return with_signature(self.gm, self.in_spec, self.out_spec, flat_outputs)

    def split(self, flat_outputs) -> tuple:
        """(the model's outputs, rebuilt from the flat ones; {extra name: tensor})."""
        n = len(self.extras)
        model = list(flat_outputs[:len(flat_outputs) - n])
        return (pytree.tree_unflatten(model, self.out_spec),
                dict(zip(self.extras, flat_outputs[len(flat_outputs) - n:])))


def rewrite(model: nn.Module, args: tuple, kwargs: dict, schedule: tuple, *,
            method: Merging | None = None, image_inputs=None, token_counts: bool = True,
            encoder_outputs: bool = False) -> Program:
    """Capture ``model`` at these inputs, analyse it and run ``PIPELINE``.

    schedule:        sorted block indices to merge at;
    method:          the merge method and its options (``mpm_fx.methods.merging``; default
                     plain MPM);
    image_inputs:    flat input positions that carry the image (default: every tensor input);
                     backends pass them when parameters arrive as graph inputs;
    token_counts, encoder_outputs: the options of ``PassContext``.
    """
    schedule = tuple(sorted(schedule))
    method = merging(method or "mpm", schedule=schedule)
    captured = capture(model, args, kwargs)
    flat_inputs = pytree.tree_leaves((args, kwargs))
    ctx = PassContext(analyse(captured.gm, flat_inputs, image_inputs), schedule, flat_inputs,
                  method=method, token_counts=token_counts, encoder_outputs=encoder_outputs)
    gm = run_pipeline(captured.gm, ctx)
    if captured.specialized:
        warnings.warn(
            f"mpm_fx specialised {len(captured.specialized)} Python branch(es) of "
            f"{type(model).__name__} on its own parameters and buffers, as they are now: "
            + "; ".join(map(str, captured.specialized)) + ". The capture is done again when "
            "those values change (mpm_report() lists them).", stacklevel=3)
    return Program(gm, captured.in_spec, captured.out_spec, ctx, schedule, captured.specialized)


def with_signature(gm: fx.GraphModule, in_spec, out_spec, flat_outputs: bool = False):
    """A flat-leaves graph given the model's call signature again (and its output structure,
    or a flat tuple of the leaves)."""
    if flat_outputs:
        out_spec = pytree.tree_structure(tuple(range(out_spec.num_leaves)))
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    gm.graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(names, in_spec, out_spec))
    gm.recompile()
    return gm


def portable(spec) -> bool:
    """Whether an output structure can be rebuilt in a process that imports nothing of the
    model's (tensors in tuples, lists and dicts), as a package needs; a library's output
    dataclass needs its library to be rebuilt."""
    if spec.is_leaf():
        return True
    return spec.type in (tuple, list, dict) and all(portable(c) for c in spec.children())


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes=PIPELINE) -> fx.GraphModule:
    """Run ``passes`` in order on ``gm``, then check and recompile it."""
    for rewrite_pass in passes:
        gm = rewrite_pass(gm, ctx)
        log.debug("%s: %s", rewrite_pass.__name__, dict(ctx.stats))
    gm.graph.lint()
    gm.recompile()
    return gm


def rewrite_dynamo_graph(gm: fx.GraphModule, example_inputs: list, schedule: tuple, *,
                         method: Merging | None = None) -> Program:
    """The pipeline on the graph a ``torch.compile`` backend receives (parameters as inputs);
    the result takes and returns the same flat lists as ``gm``."""
    return rewrite(gm, tuple(example_inputs), {}, schedule, method=method,
                   image_inputs=dynamo_image_inputs(gm), token_counts=False)
