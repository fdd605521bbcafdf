"""How one job's measured ratio changes a member's cached figures' checks (:func:`judge`).

A pure rule, so :meth:`~p2ptrain.plan.ProfileCache.check` can apply it to an entry as it is
stored, under the cache's lock (members of one device share entries).
"""

from __future__ import annotations

import statistics

from p2ptrain.plan._measured import STALE_RATIO

__all__ = ["CHECK_JOBS", "judge"]

# The jobs whose ratios make an entry's baseline (LocalProfile.checks): their median. On a
# busy host one job's ratio strays by a third (1.32 then 1.03 on the same figures), so no
# single job sets the baseline or condemns the figures.
CHECK_JOBS = 3


def judge(checks: tuple[float, ...], checked_on: str, off: float, ratio: float,
          on: str) -> tuple[str, tuple[float, ...], str, float]:
    """What one job's ``ratio`` on terms ``on`` does to an entry's ``checks`` / ``checked_on`` / ``off``:
    ``("note", checks, checked_on, off)`` to store, ``("forget", ...)`` to drop the entry, or
    ``("keep", ...)``. The first :data:`CHECK_JOBS` ratios on the same terms join the checks;
    after them a ratio beyond :data:`~p2ptrain.plan._measured.STALE_RATIO` of their median is
    noted as off, a second in a row on the same side forgets the entry, one back in line
    clears the note; a ratio on other terms changes nothing once checks exist."""
    if not checks or (on == checked_on and len(checks) < CHECK_JOBS):
        return "note", (*checks, ratio) if checks else (ratio,), on, 0.0
    if on != checked_on:
        return "keep", checks, checked_on, off
    median = statistics.median(checks)
    side = _side(ratio / median)
    if side and off and _side(off / median) == side:
        return "forget", checks, checked_on, off
    if side or off:
        return "note", checks, checked_on, ratio if side else 0.0
    return "keep", checks, checked_on, off


def _side(ratio: float) -> int:
    """-1 below ``1 / STALE_RATIO``, 1 above ``STALE_RATIO``, 0 within."""
    return -1 if ratio < 1 / STALE_RATIO else 1 if ratio > STALE_RATIO else 0
