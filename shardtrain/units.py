"""Byte sizes with units: parse "80GiB" / "24GB" / 8e10, format for humans.

GiB = 2**30 (what CUDA reports); GB = 10**9 (what vendors print). Both are accepted.

A size needs its unit: `--gpu-memory 80` was read as 80 bytes ("> 76 B usable", issue 22). A bare number
below 1 MiB (other than 0) is therefore refused with the fix ("write 80GiB"), not guessed as GiB: reading
it as GiB would be one more silent choice, and 80 could as well have meant GB. Bare numbers from 1 MiB up
stay bytes, as plan.json and run.yaml write them (no GPU, host RAM or NVMe size is under 1 MiB, so such a
number is never a forgotten unit).
"""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
GiB = 2**30
MiB = 2**20
#: The smallest bare number (no unit) read as bytes; below it a bare number is refused (see the docstring).
MIN_BARE_BYTES = MiB


def parse_bytes(value: object, *, key: str = "value") -> int:
    """Parse a size: an int/float of bytes or a string like "80GiB", "24GB", "1.5TiB"."""
    if isinstance(value, bool):
        raise ValueError(f"{key}: {value!r} is not a size; write e.g. 80GiB")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{key}: {value!r} is not a finite size; write e.g. 80GiB")
        if value < 0:
            raise ValueError(f"{key}: {value!r} is negative; sizes are >= 0")
        return _bare(key, value)
    m = _RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{key}: cannot read {value!r} as a size; write e.g. 80GiB, 24GB or 1.5TiB")
    try:
        number = float(m.group(1))
        if not m.group(2):
            return _bare(key, number)
        return int(number * _UNITS[m.group(2).lower()])
    except OverflowError:  # "1e400GiB" is float inf
        raise ValueError(f"{key}: {value!r} is not a finite size; write e.g. 80GiB") from None


def _bare(key: str, number: float) -> int:
    """A number without a unit: bytes from MIN_BARE_BYTES up (and 0), else refused (module docstring)."""
    if number == 0 or number >= MIN_BARE_BYTES:
        return int(number)
    n = f"{number:g}"
    also = f"; {n}B if you mean bytes" if number == int(number) else ""
    raise ValueError(f"{key}: {n} has no unit; write {n}GiB (or {n}GB{also})")


def parse_count(value: object, *, key: str = "value") -> int:
    """Parse a count such as 7.5e9, "7.5B", "70b", "405M"."""
    if isinstance(value, bool):
        raise ValueError(f"{key}: {value!r} is not a number; write e.g. 7.5e9 or 7.5B")
    s = str(value).strip().lower()
    mult = {"k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}.get(s[-1:], None)
    try:
        if isinstance(value, (int, float)):
            return int(value)
        return int(float(s[:-1]) * mult) if mult else int(float(s))
    except (ValueError, OverflowError):  # int(nan) is a ValueError, int(inf) an OverflowError
        raise ValueError(f"{key}: cannot read {value!r} as a number; write e.g. 7.5e9 or 7.5B") from None


def fmt_bytes(n: float) -> str:
    """Human-readable binary size, e.g. 17.3 GiB."""
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
