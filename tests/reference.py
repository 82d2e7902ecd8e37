"""Brute-force MPM, written line by line from SPEC.md with Python loops and no torch math.

Similarities are compared exactly (fractions) when every coordinate is an integer, so ties are
real ties; otherwise in Python floats. Cosines for the tie window (SPEC step 3 as mpm_fx reads it:
the smallest j within ``tolerance`` of the row's maximum) are computed in 50-digit decimals.
Independent of mpm_fx.ops on purpose.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction


def _all_finite(v):
    return all(math.isfinite(c) for c in v)


def _cos_key(a, b):
    """A number monotone in cos(a, b) for a fixed a (SPEC step 2, eps only matters at |b| = 0)."""
    dot = sum(p * q for p, q in zip(a, b))
    sq = sum(q * q for q in b)
    if all(float(c).is_integer() for c in list(a) + list(b)):
        dot, sq = int(dot), int(sq)
        if sq == 0:
            return Fraction(0)
        return Fraction(dot * abs(dot), sq)  # sign(dot) dot^2 / |b|^2, exact
    nb = max(math.sqrt(sq), 1e-12)
    return dot / nb


def cosine(a, b) -> Decimal:
    """cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps)) to 50 digits (SPEC step 2)."""
    with localcontext() as ctx:
        ctx.prec = 50
        a = [Decimal(float(c)) for c in a]
        b = [Decimal(float(c)) for c in b]
        eps = Decimal("1e-12")
        na = max(sum(c * c for c in a).sqrt(), eps)
        nb = max(sum(c * c for c in b).sqrt(), eps)
        return sum(p * q for p, q in zip(a, b)) / (na * nb)


def _pairable(tokens, valid):
    return [valid[i] and _all_finite(tokens[i]) for i in range(len(tokens))]


def neighbour_gaps(tokens: list[list[float]], valid: list[bool] | None = None,
                   allowed=None) -> list[dict]:
    """Per row i: {j: (exactly tied with the maximum, max cos - cos_ij)} over the j that may pair
    (``allowed(i, j)``: candidates only, for local MPM). Gaps under 1e-3 are computed to 50
    digits, larger ones in floats (far from any tolerance)."""
    n = len(tokens)
    valid = [True] * n if valid is None else list(valid)
    ok = _pairable(tokens, valid)
    rows = []
    for i in range(n):
        js = [j for j in range(n) if ok[i] and j != i and ok[j]
              and (allowed is None or allowed(i, j))]
        keys = {j: _cos_key(tokens[i], tokens[j]) for j in js}
        rough = {j: float(cosine_float(tokens[i], tokens[j])) for j in js}
        top_key = max(keys.values()) if keys else None
        near = [j for j in js if keys[j] == top_key or max(rough.values()) - rough[j] < 1e-3]
        exact = {j: cosine(tokens[i], tokens[j]) for j in near}
        top = max(exact.values()) if exact else None
        rows.append({j: (keys[j] == top_key,
                         top - exact[j] if j in exact else Decimal(max(rough.values()) - rough[j]))
                     for j in js})
    return rows


def cosine_float(a, b) -> float:
    dot = sum(float(p) * float(q) for p, q in zip(a, b))
    na = max(math.sqrt(sum(float(c) ** 2 for c in a)), 1e-12)
    nb = max(math.sqrt(sum(float(c) ** 2 for c in b)), 1e-12)
    return dot / (na * nb)


def merge_one(tokens: list[list[float]], valid: list[bool] | None = None, tolerance: float = 0.0,
              allowed=None, passes: int = 1):
    """One image: tokens (N lists of D floats). Returns (merged tokens, merge_map, partner).

    tolerance: similarities within it of the row's maximum are ties (0: exact ties only);
    allowed:   allowed(i, j) -> bool, the candidates of local MPM (None: every j, the SPEC);
    passes:    local MPM's passes: each further pass repeats steps 3-4 among the tokens that
               no earlier pass paired (1: the SPEC)."""
    n = len(tokens)
    valid = [True] * n if valid is None else list(valid)
    tolerance = Decimal(tolerance)
    partner, free = list(range(n)), list(valid)
    for _ in range(passes):
        def candidate(i, j, free=tuple(free)):
            return free[i] and free[j] and (allowed is None or allowed(i, j))
        for i, gaps in enumerate(neighbour_gaps(tokens, valid, candidate)):  # step 3
            if free[i]:
                tied = [j for j, (exact, gap) in gaps.items() if exact or gap <= tolerance]
                partner[i] = min(tied) if tied else i  # the smallest j
        paired = [free[i] and partner[i] != i and partner[partner[i]] == i for i in range(n)]
        free = [free[i] and not paired[i] for i in range(n)]
    mutual = [valid[i] and partner[i] != i and partner[partner[i]] == i for i in range(n)]  # step 4
    leader = [valid[i] and (not mutual[i] or i < partner[i]) for i in range(n)]  # step 5
    position, count = [], 0
    for i in range(n):  # step 6
        position.append(count if leader[i] else None)
        count += leader[i]
    merge_map = []
    for i in range(n):
        if not valid[i]:
            merge_map.append(0)
            continue
        anchor = min(i, partner[i]) if mutual[i] else i
        merge_map.append(position[anchor])
    merged = []
    for m in range(count):  # step 7: plain mean of the 1 or 2 members
        members = [i for i in range(n) if valid[i] and merge_map[i] == m]
        assert len(members) in (1, 2)
        if len(members) == 1:
            merged.append(list(tokens[members[0]]))
        else:
            a, b = (tokens[i] for i in members)
            merged.append([(p + q) / 2 for p, q in zip(a, b)])
    return merged, merge_map, partner


def has_near_tie(tokens: list[list[float]], valid: list[bool] | None = None, *,
                 low: float, high: float) -> bool:
    """True if some row has a similarity whose gap below the row's maximum lies in [low, high]
    and that is not exactly tied with it: there, rounding decides whether it is a tie."""
    return any(not exact and Decimal(low) <= gap <= Decimal(high)
               for gaps in neighbour_gaps(tokens, valid) for exact, gap in gaps.values())


def has_close_pair(tokens: list[list[float]], valid: list[bool] | None = None, *,
                   low: float, high: float) -> bool:
    """True if some row has two similarities (to any two tokens) whose difference lies in
    [low, high]: stricter than ``has_near_tie``, which measures gaps from the row's maximum
    over all tokens; a search over a subset of a row (local MPM's later passes) can make either
    of them the maximum, and there rounding decides whether the other is a tie."""
    n = len(tokens)
    ok = _pairable(tokens, [True] * n if valid is None else list(valid))
    low, high = Decimal(low), Decimal(high)
    for i in range(n):
        js = [j for j in range(n) if ok[i] and ok[j] and j != i]
        rough = sorted((cosine_float(tokens[i], tokens[j]), j) for j in js)
        exact = {}
        for k, (c, j) in enumerate(rough):
            for c2, j2 in rough[k + 1:]:
                if c2 - c > 1e-3:
                    break
                for m in (j, j2):
                    if m not in exact:
                        exact[m] = cosine(tokens[i], tokens[m])
                if low <= abs(exact[j2] - exact[j]) <= high:
                    return True
    return False


# -- the methods with a fixed count (mpm_fx/methods/tome.py, forest.py), from their docstrings --

QUANTUM = Fraction(1, 2 ** 14)  # scores are compared rounded to multiples of this
NO_EDGE = -(2 ** 14) - 1  # a fallback edge ranks below every real one


def rounded(c: Decimal) -> int:
    """floor(c / QUANTUM + 1/2), exactly."""
    with localcontext() as ctx:
        ctx.prec = 50
        return int((c * 2 ** 14 + Decimal("0.5")).to_integral_value(rounding="ROUND_FLOOR"))


def rounding_distance(c: Decimal) -> float:
    """How far c / QUANTUM + 1/2 is from an integer (where rounding flips), in quanta."""
    with localcontext() as ctx:
        ctx.prec = 50
        v = c * 2 ** 14 + Decimal("0.5")
        return float(abs(v - v.to_integral_value()))


def _finite_rows(tokens):
    return [_all_finite(t) for t in tokens]


def group_mean(tokens, sizes, members, weighted):
    """The mean of ``members`` weighted by sizes (or plain); one member is copied."""
    if len(members) == 1:
        return list(tokens[members[0]])
    w = [sizes[i] if weighted else 1.0 for i in members]
    return [sum(wi * tokens[i][d] for wi, i in zip(w, members)) / sum(w)
            for d in range(len(tokens[0]))]


def _result(tokens, sizes, groups, weighted):
    """(merged tokens, map) for groups listed in output order."""
    merge_map = [0] * len(tokens)
    for m, g in enumerate(groups):
        for i in g:
            merge_map[i] = m
    return [group_mean(tokens, sizes, g, weighted) for g in groups], merge_map


def tome_one(tokens, sizes, r, weighted=True):
    """ToMe's bipartite soft matching for one image (no prefix), as the paper states it, with
    mpm_fx's rounded scores and tie rule: returns (merged tokens, map)."""
    N, ok = len(tokens), _finite_rows(tokens)
    if r == 0:  # nothing merges: the tokens as they are
        return _result(tokens, sizes, [[i] for i in range(N)], weighted)
    A, B = list(range(0, N, 2)), list(range(1, N, 2))
    partner, score = {}, {}
    for a in A:
        qs = {b: rounded(cosine(tokens[a], tokens[b])) for b in B if ok[a] and ok[b]}
        if ok[a] and qs:
            best = max(qs.values())
            partner[a], score[a] = min(b for b in qs if qs[b] == best), best
        else:  # no finite partner: ranked last, into B token 0
            partner[a], score[a] = (B[0] if B else None), None
    order = sorted(A, key=lambda a: (score[a] is None, -(score[a] or 0), a))
    merged = set(order[:r])
    groups = [[a] for a in A if a not in merged]
    groups += [sorted([b] + [a for a in merged if partner[a] == b]) for b in B]
    return _result(tokens, sizes, groups, weighted)


def forest_neighbours(tokens, edges="all"):
    """Per token (neighbour, rounded score): the smallest j != i at the highest rounded cosine
    among finite tokens (``edges="alternate"``: among those of the other parity); no such
    token: the token before it (token 0: token 1) with NO_EDGE."""
    N, ok = len(tokens), _finite_rows(tokens)
    out = []
    for i in range(N):
        qs = {j: rounded(cosine(tokens[i], tokens[j])) for j in range(N)
              if j != i and ok[i] and ok[j] and (edges == "all" or (i - j) % 2)}
        if ok[i] and qs:
            best = max(qs.values())
            out.append((min(j for j in qs if qs[j] == best), best))
        else:
            out.append((1 if i == 0 else i - 1, NO_EDGE))
    return out


def forest_one(tokens, sizes, r, weighted=True, edges="all"):
    """Forest merging for one image (no prefix), from its docstring: the r best nearest-
    neighbour edges (by rounded score, then the pair's smaller index, then its larger), groups
    the trees they form, in the raster order of their roots. Returns (merged tokens, map)."""
    N = len(tokens)
    edges = forest_neighbours(tokens, edges) if N > 1 else []  # one token: no edge (r = 0)
    owners = [i for i in range(len(edges))
              if not (edges[edges[i][0]][0] == i and i > edges[i][0])]  # a mutual pair once
    ranked = sorted(owners, key=lambda i: (-edges[i][1], min(i, edges[i][0]), max(i, edges[i][0])))
    parent = list(range(N))
    for i in ranked[:r]:
        parent[i] = edges[i][0]

    def root(i):
        seen = set()
        while parent[i] != i:
            assert i not in seen, "a cycle among the kept edges"
            seen.add(i)
            i = parent[i]
        return i

    trees = {}
    for i in range(N):
        trees.setdefault(root(i), []).append(i)
    groups = [trees[k] for k in sorted(trees)]
    return _result(tokens, sizes, groups, weighted)


def mpm_weighted_one(tokens, sizes, tolerance=0.0):
    """Size-weighted MPM: the SPEC's pairs, each pair's mean weighted by its tokens' sizes."""
    _, merge_map, _ = merge_one(tokens, None, tolerance)
    groups = {}
    for i, m in enumerate(merge_map):
        groups.setdefault(m, []).append(i)
    return [group_mean(tokens, sizes, groups[m], True) for m in sorted(groups)], merge_map


def window_neighbours(total_map: list[int], grid: tuple, window: int):
    """allowed(i, j) of local MPM: token j holds a patch within window // 2 rows and columns of
    a patch of token i (total_map: the token of every original patch, raster order)."""
    rows, cols = grid
    reach = window // 2
    patches = {}
    for p, t in enumerate(total_map):
        patches.setdefault(t, []).append(divmod(p, cols))

    def allowed(i, j):
        return any(abs(ri - rj) <= reach and abs(ci - cj) <= reach
                   for ri, ci in patches.get(i, []) for rj, cj in patches.get(j, []))
    return allowed
