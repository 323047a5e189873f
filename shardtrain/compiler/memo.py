"""Memoisation of the planner's pure helpers by argument identity (planning speed, issue 20 point 1).

The planner evaluates thousands of candidates per plan, and ``plan --max`` dozens of plans, over the same
few frozen objects (one ModelSpec, one tensor inventory per method, one mesh per pair). ``functools.
lru_cache`` hashes them field by field on every call — most of the cost for the small helpers. Here an
object argument is keyed by its identity (the cache holds a reference, so the id is not reused while cached)
and a scalar (int, float, str, bool, None, an enum, a tuple of scalars) by value. Only for PURE functions of IMMUTABLE arguments
(frozen dataclasses, tuples of them, scalars): an equal but distinct object is a miss, never a wrong hit.
"""
from __future__ import annotations

import enum
import functools

_SCALARS = (int, float, str, bool, type(None))
MAX_ENTRIES = 8192
"""Per function; the cache is emptied when it grows past this (a long session of plans)."""


_MUTABLE = (list, dict, set, bytearray)
_KIND: dict[type, int] = {}
"""Per argument type: 0 keyed by identity, 1 by value (a scalar or an enum), 2 a tuple (by value if all
scalars), 3 mutable (a list, dict, set: the call is not memoised)."""


def _kind(t: type) -> int:
    k = _KIND.get(t)
    if k is None:
        k = _KIND[t] = (2 if t is tuple else 3 if issubclass(t, _MUTABLE)
                        else int(issubclass(t, _SCALARS) or issubclass(t, enum.Enum)))
    return k


def _by_value(a) -> bool:
    k = _kind(type(a))
    return k == 1 or (k == 2 and all(isinstance(e, _SCALARS) for e in a))


def _key(args: tuple) -> tuple:
    return tuple((type(a), a) if _by_value(a) else ("#", id(a)) for a in args)


def by_identity(fn):
    """Memoise ``fn(*args)`` (positional arguments only) by argument identity; see the module docstring."""
    cache: dict[tuple, tuple[tuple, object]] = {}

    @functools.wraps(fn)
    def memo(*args):
        if any(_kind(type(a)) == 3 for a in args):
            return fn(*args)
        k = _key(args)
        hit = cache.get(k)
        if hit is not None and all(a is b or _by_value(a) for a, b in zip(hit[0], args)):
            return hit[1]
        if len(cache) >= MAX_ENTRIES:
            cache.clear()
        v = fn(*args)
        cache[k] = (args, v)
        return v
    memo.cache_clear = cache.clear
    return memo
