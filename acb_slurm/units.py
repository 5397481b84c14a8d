"""Byte sizes as people write them ("80GiB", "512M", "1.5 GB") and back."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size. Bare numbers are bytes; K/M/G/T alone are binary (Slurm's habit).

    Raises ValueError naming the accepted forms when `text` is not a size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a size: {text!r} (write e.g. 80GiB, 512MiB, 16G, 1.5GB or a number of bytes)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


#: A size written without a unit and below this (1 MiB) is almost certainly a missing unit
#: (`memory: 30` meant 30GiB, not 30 bytes): `parse_written_size` refuses it.
MIN_BARE_SIZE = 1024**2
_BARE = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")


def parse_written_size(text: str | int) -> int:
    """`parse_size` for a size a person wrote in a file or an option: a number without a unit
    below MIN_BARE_SIZE (1 MiB) is refused as a missing unit; write 512B to mean bytes.

    Zero passes (the caller says whether zero is allowed). ValueError says what to write.
    """
    size = parse_size(text)
    bare = isinstance(text, int) or _BARE.match(text) is not None
    if bare and 0 < size < MIN_BARE_SIZE:
        number = str(text).strip()
        raise ValueError(
            f"{text!r} has no unit, so it is {size} byte{'s' if size != 1 else ''}: a size below "
            f"1 MiB without a unit is almost certainly a missing unit; write {number}GiB or "
            f"{number}MiB (or {number}B if you do mean bytes)"
        )
    return size


def format_size(n: int) -> str:
    """Format bytes with a binary unit, e.g. 85899345920 -> '80.0GiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"
