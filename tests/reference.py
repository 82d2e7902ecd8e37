"""Brute-force MPM, written line by line from SPEC.md with Python loops and no torch math.

Similarities are compared exactly (fractions) when every coordinate is an integer, so ties are
real ties; otherwise in Python floats. Independent of mpm_fx.ops on purpose.
"""

from __future__ import annotations

import math
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


def merge_one(tokens: list[list[float]], valid: list[bool] | None = None):
    """One image: tokens (N lists of D floats). Returns (merged tokens, merge_map, partner)."""
    n = len(tokens)
    valid = [True] * n if valid is None else list(valid)
    pairable = [valid[i] and _all_finite(tokens[i]) for i in range(n)]
    partner = []
    for i in range(n):  # step 3: argmax over j != i, ties to the smallest j
        best, best_j = None, i
        if pairable[i]:
            for j in range(n):
                if j == i or not pairable[j]:
                    continue
                k = _cos_key(tokens[i], tokens[j])
                if best is None or k > best:
                    best, best_j = k, j
        partner.append(best_j)
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


def has_fragile_tie(tokens: list[list[float]], valid: list[bool] | None = None) -> bool:
    """True if some row's best similarity is shared by tokens that are not identical.

    Such ties are exact in real arithmetic (e.g. b and 3b have the same cosine to a) but floating
    point rounds them apart, so no float implementation can be held to the smallest-j rule there.
    Ties among identical tokens stay: those are well defined and must break to the smallest j.
    """
    n = len(tokens)
    valid = [True] * n if valid is None else list(valid)
    ok = [valid[i] and _all_finite(tokens[i]) for i in range(n)]
    for i in range(n):
        if not ok[i]:
            continue
        keys = {j: _cos_key(tokens[i], tokens[j]) for j in range(n) if j != i and ok[j]}
        if not keys:
            continue
        top = max(keys.values())
        tied = [j for j, k in keys.items() if k == top]
        if any(list(tokens[j]) != list(tokens[tied[0]]) for j in tied):
            return True
    return False
