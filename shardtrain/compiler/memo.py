"""Memoisation of the planner's pure helpers by argument identity (planning speed, issue 20 point 1).

The planner evaluates thousands of candidates per plan, and ``plan --max`` dozens of plans, over the same
few frozen objects (one ModelSpec, one tensor inventory per method, one mesh per pair). ``functools.
lru_cache`` hashes them field by field on every call — most of the cost for the small helpers. Here the
arguments at the positions ``by_identity`` names are keyed by identity (the cache holds a reference, so the
id is not reused while cached) and every other argument by value (it must be hashable: an int, an enum, a
tuple of ints). Only for PURE functions of IMMUTABLE arguments (frozen dataclasses, tuples of them, scalars):
an equal but distinct object is a miss, never a wrong hit; a call with a list, dict or set at an identity
position is not memoised.
"""
from __future__ import annotations

import functools

_MUTABLE = (list, dict, set, bytearray)
MAX_ENTRIES = 8192
"""Per function; the cache is emptied when it grows past this (a long session of plans)."""


def by_identity(*positions: int):
    """``@by_identity`` (the first argument by identity) or ``@by_identity(0, 1)``: memoise ``fn(*args)``
    (positional arguments only); see the module docstring."""
    if len(positions) == 1 and callable(positions[0]):
        return _memoise(positions[0], (0,))
    return functools.partial(_memoise, ids=tuple(positions))


def _memoise(fn, ids: tuple[int, ...]):
    cache: dict[tuple, tuple[tuple, object]] = {}
    ids_set = frozenset(ids)

    @functools.wraps(fn)
    def memo(*args):
        held = tuple(args[i] for i in ids)
        if any(isinstance(a, _MUTABLE) for a in held):
            return fn(*args)
        k = tuple(id(a) if i in ids_set else a for i, a in enumerate(args))
        hit = cache.get(k)
        if hit is not None and all(a is b for a, b in zip(hit[0], held)):
            return hit[1]
        if len(cache) >= MAX_ENTRIES:
            cache.clear()
        v = fn(*args)
        cache[k] = (held, v)
        return v
    memo.cache_clear = cache.clear
    return memo
