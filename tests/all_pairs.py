"""Covering arrays for parametrized tests whose every case costs an interpreter run.

``all_pairs(a, b, c, ...)`` returns tuples of values in which every pair of values of any two
factors appears at least once. Bugs in the kernels here hinge on one parameter or on two
interacting (a head count with a block size, a mask with a dtype); the full product multiplies
CI time for the rare three-way case.
"""
from __future__ import annotations

import itertools
from typing import Sequence


def all_pairs(*factors: Sequence) -> list[tuple]:
    """Greedy: repeatedly take the combination that covers the most pairs not yet covered
    (the first such one, so the result is deterministic)."""
    sizes = [len(f) for f in factors]
    if any(n == 0 for n in sizes):
        return []
    if len(factors) == 1:
        return [(v,) for v in factors[0]]
    combos = list(itertools.product(*(range(n) for n in sizes)))
    dims = list(itertools.combinations(range(len(factors)), 2))
    uncovered = {(i, j, a, b) for i, j in dims for a in range(sizes[i]) for b in range(sizes[j])}
    rows = []
    while uncovered:
        best = max(combos, key=lambda c: sum((i, j, c[i], c[j]) in uncovered for i, j in dims))
        uncovered -= {(i, j, best[i], best[j]) for i, j in dims}
        rows.append(tuple(f[k] for f, k in zip(factors, best)))
    return rows
