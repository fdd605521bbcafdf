"""Checks the benches share: a count that must be positive, a size that must fit in memory.

A walkthrough found ``--repeat 0`` ending in ``StatisticsError: no median for empty data``,
``--transfers -1`` reporting -1685 GB/s, ``--size 100GiB`` a raw allocator traceback and
``--idle-s 0`` a NaN that no JSON reader takes: each is now one line before anything runs.
"""

from __future__ import annotations

from p2ptrain._errors import ConfigError
from p2ptrain.discovery import available_memory

__all__ = ["at_least", "fits_in_memory"]


def at_least(flag: str, value: float, lo: float) -> None:
    """Refuse ``--flag value`` below ``lo`` (or not a number)."""
    if not value >= lo:
        raise ConfigError(f"{flag} must be at least {lo:g}, got {value}")


def fits_in_memory(flag: str, nbytes: int, copies: int) -> None:
    """Refuse a size whose ``copies`` (the bench's tensors over all its processes) would not fit in free memory."""
    free = available_memory()
    if free is not None and nbytes * copies > 0.8 * free:
        raise ConfigError(f"{flag}: {copies} copies of {nbytes / 2**30:.1f} GiB would not fit in the "
                          f"{free / 2**30:.1f} GiB of memory available here; choose a smaller size")
