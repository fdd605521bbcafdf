"""Waiting on several tasks without leaving one behind that asyncio will complain about.

``asyncio.wait_for(asyncio.gather(...))`` cancelled from outside (a host's own
``wait_for(submit(...), t)`` expiring) leaves the gather's CancelledError unretrieved, and
asyncio logs "_GatheringFuture exception was never retrieved" with a traceback when it is
collected. A send cancelled as its peer is removed can end with an error nobody awaits.
And ``with suppress(BaseException): await fut`` swallows the caller's own cancellation
along with ``fut``'s outcome, so a task cancelled while it waits there carries on. The
helpers here end every task they start, retrieve how it ended, and let a cancellation of
the caller through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any

__all__ = ["cancel_quietly", "gather_within", "wait_ended"]


def cancel_quietly(fut: asyncio.Future[Any]) -> None:
    """Cancel ``fut``, a send or wait nobody will await any more, and retrieve how it ends.

    A task that has already failed, or that ends with an error although cancelled (a send
    resuming as its peer is removed: "removed before the message left"), would otherwise be
    logged by asyncio as "Task exception was never retrieved" long after it stopped
    mattering: tracebacks in an idle member's log a minute after a job ended.
    """
    fut.cancel()
    fut.add_done_callback(_retrieve)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def gather_within(aws: Iterable[Awaitable[Any]], timeout: float) -> bool:
    """Run ``aws`` together for at most ``timeout`` seconds; True when all finished.

    The first one to fail ends the wait and its error is raised. Whatever is still
    running when this returns or raises (a timeout, an error, this coroutine cancelled)
    is cancelled quietly.
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return True
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            cancel_quietly(t)
    for t in tasks:
        if t.done() and not t.cancelled() and (exc := t.exception()) is not None:
            raise exc
    return all(t.done() for t in tasks)


async def wait_ended(fut: asyncio.Future[Any]) -> None:
    """Wait until ``fut`` is done, whatever its outcome (retrieved, not raised).

    Raises:
        asyncio.CancelledError: the caller was cancelled meanwhile (``fut`` goes on).
    """
    await asyncio.wait([fut])
    _retrieve(fut)
