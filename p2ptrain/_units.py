"""Parsing of human-written quantities on the command line (``--size 64MiB``)."""

from __future__ import annotations

import re
from decimal import Decimal

from p2ptrain._errors import ConfigError

__all__ = ["parse_size"]

# Binary (IEC) and decimal (SI) byte units, matched case-insensitively: "64MiB", "64mib".
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"\s*([0-9]{1,15}(?:\.[0-9]{1,15})?)\s*([A-Za-z]{0,3})\s*")
_HINT = "write a byte count like 1000000, 64MiB, 1.5GiB or 512kB (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def parse_size(text: str) -> int:
    """Bytes in a size written as a number with an optional unit.

    ``"1000000"`` and ``"1000000B"`` are bytes, ``"64MiB"`` is 64 * 2**20, ``"2GB"`` is
    2 * 10**9; a fraction is fine when the result is whole bytes (``"1.5KiB"`` = 1536).

    Raises:
        ConfigError: not a size, unknown unit, or not a whole number of bytes.
    """
    if not isinstance(text, str):
        raise ConfigError(f"size must be a string, got {type(text).__name__}; {_HINT}")
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ConfigError(f"cannot read {text[:40]!r} as a size; {_HINT}")
    number, unit = m.groups()
    scale = _UNITS.get(unit.lower())
    if scale is None:
        raise ConfigError(f"unknown size unit {unit!r} in {text!r}; {_HINT}")
    value = Decimal(number) * scale
    if value != value.to_integral_value():
        raise ConfigError(f"{text!r} is {value} bytes, not a whole number; {_HINT}")
    return int(value)
