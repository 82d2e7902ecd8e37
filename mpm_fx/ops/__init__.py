"""The op layer's shared pieces: plain tensor code, torch only, imported by the merge methods
(``mpm_fx.methods``), the passes and the backends, never importing them.

- ``tokens``: ``MergeResult`` (what every merge returns), ``compose``, ``reconstruct``, and what
  the maps say about merged tokens (``token_sizes``, ``leaders``, ``gather_positions``);
- ``similarity``: unit rows (SPEC step 2), the tie rules (``tie_tolerance``, ``quantize``),
  ``key_metric`` and ``projected_keys`` (the keys as a merge's metric, after or before the
  attention);
- ``masks``: padding masks of later attentions (SPEC step 8);
- ``groups``: the group means and count checks of the methods that merge a fixed count;
- ``size_aware``: proportional attention that keeps the flash kernel;
- ``varlen``: per-image attention over a padded batch (a custom op).

MPM's own merge (docs/SPEC.md) is the method module ``mpm_fx.methods.mpm``, like every other
method; ``mpm_fx.merge`` is it.
"""

from mpm_fx.ops.masks import key_mask, mask_keys, mask_scores, per_key
from mpm_fx.ops.similarity import (
    QUANTUM,
    key_metric,
    projected_keys,
    quantize,
    tie_tolerance,
    unit_rows,
)
from mpm_fx.ops.tokens import (
    MergeResult,
    compose,
    gather_positions,
    leaders,
    reconstruct,
    token_sizes,
)

__all__ = ["MergeResult", "compose", "reconstruct", "leaders", "gather_positions", "token_sizes",
           "key_mask", "per_key", "mask_scores", "mask_keys", "key_metric", "projected_keys",
           "unit_rows",
           "tie_tolerance", "QUANTUM", "quantize"]
