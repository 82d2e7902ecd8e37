"""Merge methods: which tokens merge, as a choice of the one pass.

Every method is one op module ``mpm_fx/methods/<name>.py`` (torch only, the op layer), listed in
``MODULES`` below, with one contract::

    merge(x, valid=None, *, prefix=0, sizes=None, metric=None, **options) -> MergeResult

    x       (B, P + N, D)  the tokens where the merge goes; the first P (prefix) never merge
    valid   (B, N) or None padding from an earlier merge (False); methods that keep a fixed
                           count never pad and take None
    sizes   (B, N) or None how many original patches each token stands for (None: 1 each)
    metric  (B, P + N, E)  what similarity is computed on (None: x; the attention keys
                           averaged over heads where a method merges between attention and MLP)
    ->      MergeResult(tokens (B, P + M, D), merge_map (B, N) into [0, M), valid (B, M))

and module attributes that say what it is: ``SUMMARY`` (one line), ``COUNTED`` (takes ``r``,
the image tokens each merge removes: every image keeps the same count, no padding), its default
``PLACEMENT`` and ``SIZE_AWARE``, and ``OPTIONS`` (its own options and their defaults: a value
given must have its default's type); a method whose options need more than that defines
``check_options(options) -> options`` (one-line ``ValueError`` naming the fix).
A method that finds its count per image defines ``token_bounds(n, whole=...)``, the counts one
merge can give. A method with ``POSITIONS = True`` also receives ``total_map`` (B, N0), the
composed map of the earlier merges (None at the first), and ``patch_grid`` (rows, cols) of the
original image tokens, found by the analysis.

The group sizes and the leaders (first original token) of merged tokens follow from the maps
(``ops.token_sizes``, ``ops.leaders``), the same for every method. So reconstruction at every
tap, position tables gathered by leaders, padding masks, size-aware attention, token-count
following and every backend work unchanged whatever the method: the passes never ask which
one they carry, only what the resolved ``Merging`` says (its op, the op's arguments at each
merge, placement, whether it pads, the counts it can give).

=========  ======================================================  ======================
name       what merges                                             count
=========  ======================================================  ======================
``mpm``    mutual nearest-neighbour pairs (docs/SPEC.md)            found per image
``tome``   bipartite soft matching (ToMe, ICLR 2023)                ``r`` per merge
``forest`` the r best nearest-neighbour edges, as trees             ``r`` per merge
``local``  mutual pairs among spatial neighbours (linear cost)      found per image
=========  ======================================================  ======================

``merging(method, **options)`` checks a choice and its options and returns a ``Merging``;
``policy("forest:edges=alternate")`` reads a method and its options as command lines write them.
Settings every method takes: ``placement`` ("before_block": on the residual stream at a block's
input, where MPM merges; "after_attention": between the block's attention and its MLP, on the
attention keys, where ToMe merges), ``metric`` (before the block: "tokens", the stream itself,
or "keys", the keys the block would compute from the unmerged tokens, so that the block's
attention runs on the merged tokens), ``size_aware`` (proportional attention after merges) and
``attention`` (how later attentions skip a batch's padding: "masked", "varlen" or "auto").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from mpm_fx.schedule import as_int

__all__ = ["METHODS", "MODULES", "PLACEMENTS", "METRICS", "ATTENTIONS", "Method", "Merging",
           "merging", "counted", "option_names", "describe", "removals", "at_counts", "policy",
           "label"]

PLACEMENTS = ("before_block", "after_attention")
# what a merge's similarity is computed on: "tokens" (the tokens it merges; MPM's, the SPEC's) or
# "keys" (the block's attention keys: after the attention its own, averaged over heads, as
# ToMe; before the block the keys the block would compute from the unmerged tokens, every head
# side by side, from its input norm and key projection run once more on them)
METRICS = ("tokens", "keys")
# how attentions after a padding merge skip padded keys: "masked" (a key mask on SDPA),
# "varlen" (each image on its own keys, mpm_fx.varlen), "auto" (varlen on CUDA, else masked)
ATTENTIONS = ("auto", "masked", "varlen")


# name -> its op module; a new method is a module here and one line in this table
MODULES = {
    "mpm": "mpm_fx.methods.mpm",
    "tome": "mpm_fx.methods.tome",
    "forest": "mpm_fx.methods.forest",
    "local": "mpm_fx.methods.local",
}
METHODS = tuple(MODULES)


@dataclass(frozen=True)
class Method:
    """One merge method: what its op module says about itself (module attributes of the same
    names, upper case), read when the method is first used."""

    name: str
    op: object  # the module's merge function
    summary: str
    counted: bool  # takes r, the image tokens each merge removes (fixed counts, no padding)
    placement: str  # default placement
    size_aware: bool  # default proportional attention
    options: dict  # its own options and their defaults
    positions: bool  # reads where its tokens are: the composed map and the patch grid
    module: object

    @classmethod
    def of(cls, name: str) -> Method:
        module = importlib.import_module(MODULES[name])
        return cls(name, module.merge, module.SUMMARY, module.COUNTED, module.PLACEMENT,
                   module.SIZE_AWARE, dict(module.OPTIONS), getattr(module, "POSITIONS", False),
                   module)


class _Registry(dict):
    """name -> Method, each built from its module on first use (no import until then)."""

    def __missing__(self, name):
        if name not in MODULES:
            raise KeyError(name)
        self[name] = Method.of(name)
        return self[name]

    def __contains__(self, name):
        return name in MODULES

    def values(self):
        return [self[name] for name in MODULES]

    def items(self):
        return [(name, self[name]) for name in MODULES]


_METHODS = _Registry()


@dataclass(frozen=True)
class Merging:
    """A merge method with its options, checked: what the pass inserts at every merge."""

    method: str
    placement: str
    size_aware: bool
    r: tuple | int | None = None  # counted methods: removed per merge (an int: at every merge)
    own_options: dict = field(default_factory=dict)  # the method's own options, every one set
    # (placement, size_aware, attention and r are the fields every method has)
    attention: str = "auto"  # of ATTENTIONS: padded batches masked, or per image (varlen)
    metric: str = "tokens"  # of METRICS (after the attention: always "keys")

    @property
    def spec(self) -> Method:
        return _METHODS[self.method]

    @property
    def op(self):
        return self.spec.op

    @property
    def pads(self) -> bool:
        """Whether images of a batch can end with different counts (padding and masks)."""
        return not self.spec.counted

    @property
    def uses_positions(self) -> bool:
        """Whether the op reads where its tokens are (``total_map`` and ``grid``)."""
        return self.spec.positions

    @property
    def uses_sizes(self) -> bool:
        """Whether the op reads the tokens' sizes (weighted means)."""
        return bool(self.own_options.get("weighted"))

    def kwargs(self, i: int, *, total_map=None, patch_grid=None) -> dict:
        """The op's keyword arguments at the i-th merge of the schedule: the method's options,
        r for a counted method, and where the tokens are (``total_map``, the composed map of
        the earlier merges, and ``patch_grid``) for a method that reads positions."""
        kwargs = dict(self.own_options)
        if self.r is not None:
            kwargs["r"] = self.r if isinstance(self.r, int) else self.r[i]
        if self.uses_positions:
            kwargs.update(total_map=total_map, patch_grid=patch_grid)
        return kwargs

    def removed(self, i: int) -> int:
        """r at the i-th merge (a counted method)."""
        return self.r if isinstance(self.r, int) else self.r[i]

    def counts(self, image_tokens: int, merges: int) -> list:
        """Image tokens after each merge, for a counted method (None for MPM: per image)."""
        if self.r is None:
            return [None] * merges
        path, n = [], image_tokens
        for i in range(merges):
            n -= self.removed(i)
            path.append(n)
        return path

    def bounds(self, n: int, i: int, whole: bool) -> tuple:
        """(least, most) image tokens per image after the i-th merge of ``n`` tokens."""
        if self.r is None:
            return self.spec.module.token_bounds(n, whole=whole)
        m = n - self.removed(i)
        return m, m

    def check_counts(self, schedule: tuple, image_tokens: int) -> None:
        """Every r within what the method can remove where it merges: 0..N // 2 of the N image
        tokens that merge receives. Raises ValueError naming the merge and the fix."""
        if self.r is None:
            return
        n = image_tokens
        for i, block in enumerate(schedule):
            r = self.removed(i)
            if r > n // 2:
                raise ValueError(
                    f"r={r} at the merge in block {block} is more than {self.method!r} can remove "
                    f"there: it receives {n} image tokens and removes at most half ({n // 2}); "
                    f"lower r (counts so far: {image_tokens} -> "
                    f"{' -> '.join(map(str, self.counts(image_tokens, i + 1)))})")
            n -= r

    def describe(self) -> str:
        """'tome (r=100, after_attention, size-aware)'."""
        parts = ([f"r={self.r if isinstance(self.r, int) else list(self.r)}"]
                 if self.r is not None else [])
        parts += [self.placement] + (["size-aware"] if self.size_aware else [])
        if self.metric == "keys" and self.placement == "before_block":
            parts.append("metric=keys")
        parts += [f"{k}={v}" for k, v in self.own_options.items() if v != self.spec.options[k]]
        parts += [f"attention={self.attention}"] if self.attention != "auto" else []
        return f"{self.method} ({', '.join(parts)})"


def merging(method="mpm", *, schedule=None, r=None, placement=None, size_aware=None,
            attention=None, metric=None, **options) -> Merging:
    """Check a merge method and its options; ``schedule`` (normalised) checks r's length.

    Raises ValueError, one line naming the fix, for an unknown method or option, an r given
    to a method that finds its own count, a counted method without r, or an r that is not a
    non-negative int (or one per merge)."""
    if isinstance(method, Merging):
        if r is not None or placement is not None or size_aware is not None \
                or attention is not None or metric is not None or options:
            raise ValueError("pass either a Merging or a method name with its options, not both")
        if schedule is not None:
            _check_r(method.spec, method.r, schedule)
        return method
    if method not in _METHODS:
        raise ValueError(f"unknown merge method {method!r}: choose from {', '.join(METHODS)} "
                         "(mpm_fx.METHODS)")
    spec = _METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        known = ", ".join(["r"] * spec.counted + ["placement", "metric", "size_aware",
                                                   "attention", *spec.options])
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {method!r}: it "
                         f"takes {known}")
    if placement is None:
        placement = spec.placement
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    r = _check_r(spec, r, schedule)
    resolved = {**spec.options, **options}
    check = getattr(spec.module, "check_options", None)
    if check is not None:
        resolved = check(resolved)
    else:
        for name, value in options.items():
            if type(value) is not type(spec.options[name]):
                raise ValueError(f"option {name} of {method!r} must be a "
                                 f"{type(spec.options[name]).__name__}, got {value!r}")
    aware = spec.size_aware if size_aware is None else size_aware
    if not isinstance(aware, bool):
        raise ValueError(f"size_aware must be True, False or None (the method's default), got "
                         f"{size_aware!r}")
    attention = "auto" if attention is None else attention
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)} (how attentions "
                         f"after a merge skip a batch's padding), got {attention!r}")
    return Merging(method, placement, aware, r, resolved, attention,
                   _check_metric(metric, placement))


def policy(text: str) -> tuple:
    """A method with its own options as command lines write it: ``"forest"`` or
    ``"forest:edges=alternate"`` (more options: more ``:name=value`` parts) -> ("forest",
    {"edges": "alternate"}). Values are read as Python literals where they are one (``True``,
    ``3``, ``None``; ``true``/``false`` too), else kept as text; ``merging`` checks them. Imports
    no op module (no torch). Raises ValueError naming the fix for an unknown method, a part
    that is not ``name=value`` or an option given twice."""
    import ast

    method, *parts = [p.strip() for p in text.strip().split(":")]
    if method not in MODULES:
        raise ValueError(f"unknown merge method {method!r} in {text!r}: choose from "
                         f"{', '.join(METHODS)}")
    options = {}
    for part in parts:
        name, eq, value = part.partition("=")
        if not eq or not name.strip().isidentifier():
            raise ValueError(f"{part!r} in {text!r} is not an option: write method:name=value, "
                             "e.g. forest:edges=alternate")
        if name.strip() in options:
            raise ValueError(f"option {name.strip()!r} is given twice in {text!r}: keep one")
        value = value.strip()
        value = {"true": "True", "false": "False", "none": "None"}.get(value, value)
        try:
            options[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[name.strip()] = value
    return method, options


def label(method: str, options: dict) -> str:
    """``policy``'s inverse: "forest:edges=alternate" (options in the order given)."""
    return ":".join([method] + [f"{k}={v}" for k, v in options.items()])


def counted(method: str) -> bool:
    """Whether a method merges a fixed count (takes r)."""
    return _METHODS[method].counted


def removals(image_tokens: int, merges: int, fraction: float) -> tuple:
    """r of a counted method at each of ``merges`` merges that each remove ``fraction`` of the
    image tokens they receive: floor(fraction N), at most N // 2 (what one merge can remove)."""
    n, rs = image_tokens, []
    for _ in range(merges):
        rs.append(min(int(fraction * n), n // 2))
        n -= rs[-1]
    return tuple(rs)


def at_counts(method: str, image_tokens: int, counts, **options) -> dict:
    """The ``mpm_fx.optimize`` options of a counted method that leaves ``counts`` image tokens
    after its merges (one count per merge, rounded; e.g. MPM's mean counts over some images):
    {"method": method, "r": (removed at each merge), **options}."""
    if not counted(method):
        raise ValueError(f"{method!r} finds its own count per image: only the methods that "
                         f"merge a fixed count ({', '.join(m for m in METHODS if counted(m))}) "
                         "take counts")
    path = [image_tokens] + [int(round(c)) for c in counts]
    return {"method": method, "r": tuple(a - b for a, b in zip(path, path[1:])), **options}


def option_names(method) -> tuple:
    """The options ``merging`` takes for ``method`` (a name or a Merging); () if unknown."""
    if isinstance(method, Merging):
        return ()
    spec = _METHODS[method] if method in _METHODS else None
    return ("r", "placement", "metric", "size_aware", "attention", *spec.options) if spec else ()


def _check_metric(metric, placement: str) -> str:
    """The metric of a placement: None gives its own ("tokens" before the block, "keys" after
    the attention); after the attention the merge always reads the attention's keys."""
    if metric is None:
        return "keys" if placement == "after_attention" else "tokens"
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)} (what the similarity is "
                         f"computed on), got {metric!r}")
    if placement == "after_attention" and metric != "keys":
        raise ValueError("a merge between attention and MLP (placement='after_attention') "
                         "always reads the attention's keys: drop metric, or merge before the "
                         "block (placement='before_block')")
    return metric


def _check_r(spec: Method, r, schedule):
    if not spec.counted:
        if r is not None:
            counted = ", ".join(m for m, s in _METHODS.items() if s.counted)
            raise ValueError(f"r is an option of the methods that merge a fixed count ({counted}):"
                             f" {spec.name!r} finds its own count per image; drop r, or choose "
                             "one of those")
        return None
    if r is None:
        raise ValueError(f"method {spec.name!r} needs r: the image tokens each merge removes, an "
                         "int or one int per merge, e.g. r=100 or r=(200, 150)")
    if isinstance(r, (list, tuple)):
        r = tuple(_count(v) for v in r)
        if schedule is not None and len(r) != len(schedule):
            raise ValueError(f"r has {len(r)} entries but the schedule {tuple(schedule)} has "
                             f"{len(schedule)} merges: give one int per merge, or one int for all")
        return r
    return _count(r)


def _count(value) -> int:
    count = as_int(value)
    if count is None:
        raise ValueError(f"r must be an int or a sequence of ints (image tokens to remove per "
                         f"merge), got {value!r}")
    if count < 0:
        raise ValueError(f"r must be >= 0 (image tokens to remove), got {count}")
    return count


def describe() -> str:
    """One line per method: name, what merges, its count."""
    return "\n".join(f"{m.name:8s} {m.summary}; " + ("r per merge" if m.counted else
                                                      "count per image")
                     for m in _METHODS.values())
