"""The one bounded wait the tests share: poll a condition until it holds or time runs out.

``tests/`` is on ``sys.path`` (``tests/conftest.py`` lives there), so any test folder can
``from _wait import until``.

Prefer awaiting an event, a queue or a task with ``asyncio.wait_for`` when the code under
test offers one. ``until`` is for state that changes with no event to await: a counter
bumped by a receive loop, a view agreed on by several nodes, a child process's output
read by another task. Never ``sleep(n)`` and then assert; wait on the condition instead.
A sleep is right only to let time pass on purpose, to show that something does *not*
happen; say so in a comment where it is done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["POLL_S", "until"]

POLL_S = 0.01
"""Seconds between two looks at the condition: cheap, and fine-grained next to any timeout."""


async def until(cond: Callable[[], object], timeout: float, what: str = "condition") -> float:
    """Wait until ``cond()`` is true, looking every 10 ms; return the seconds it took.

    ``cond`` is called on the event loop, so it must be cheap and must not block. It is
    looked at before the first sleep (a condition already true returns at once) and
    after every sleep, the last one included, so a late wake-up of a busy loop is not
    mistaken for a timeout when the condition did come true.

    Args:
        cond: what to wait for; its result is taken as a truth value.
        timeout: the most seconds to wait, > 0. Size it to the protocol timers of the
            test, with room for a loaded 2-core CI machine.
        what: what ``cond`` stands for, named in the failure message.

    Returns:
        Seconds from the call until ``cond()`` was seen true, for tests that bound how
        fast something happens.

    Raises:
        AssertionError: ``cond()`` still false after ``timeout`` seconds; the message
            names ``what`` and the timeout.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    while not cond():
        # Checked after cond(): a last look taken after the deadline still counts.
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - t0
