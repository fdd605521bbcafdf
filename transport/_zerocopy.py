"""Knowing when libzmq is done with memory we lent it (zero-copy sends).

pyzmq keeps each object sent with ``copy=False`` in a table until libzmq's free callback
reaches its garbage-collector thread, which then drops the reference. A
``weakref.finalize`` on a numpy chunk therefore fires exactly when libzmq has released
it; :class:`Completion` turns that (on any thread) into an asyncio future.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

__all__ = ["COPY_THRESHOLD", "Completion", "term_off_loop", "track_copy", "track_last_chunk", "wait_released"]

#: Frames below this are copied by pyzmq anyway (its own default, 64 KiB): copying small
#: frames is cheaper than tracking them. Endpoints set it on every socket so it is known.
COPY_THRESHOLD = 1 << 16


class Completion:
    """Resolves :attr:`future` once ``count`` watched objects have been released."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._loop = loop
        self._left = count
        self._lock = threading.Lock()
        self.future: asyncio.Future[None] = loop.create_future()

    def watch(self, obj: Any) -> None:
        """Count ``obj`` released when it is garbage (it must support weak references)."""
        fin = weakref.finalize(obj, self.release)
        fin.atexit = False

    def release(self) -> None:
        """Called from whichever thread drops a watched object (pyzmq's gc thread, usually)."""
        with self._lock:
            self._left -= 1
            done = self._left == 0
        if done:
            try:
                self._loop.call_soon_threadsafe(self._finish)
            except RuntimeError:  # loop closed: nobody waits any more
                pass

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


async def wait_released(fut: asyncio.Future[None], deadline: float | None) -> bool:
    """Wait for a :class:`Completion`'s future until ``deadline`` (loop time), never cancelling it.

    The future belongs to the wire (``flush`` waits on it too), so neither a timeout nor
    this task's cancellation may touch it. One waiter future and at most one timer: about
    a third of what ``wait_for(shield(fut))`` costs, on every zero-copy send.

    Returns:
        True once released; False when ``deadline`` passed first.
    """
    if fut.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(True)

    fut.add_done_callback(wake)
    timer = None if deadline is None else loop.call_at(deadline, _time_up, waiter)
    try:
        return await waiter
    finally:
        if timer is not None:
            timer.cancel()
        fut.remove_done_callback(wake)


def _time_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def track_last_chunk(frames: list[Any], loop: asyncio.AbstractEventLoop) -> Completion | None:
    """A completion for when libzmq has released every zero-copy chunk of ``frames``.

    Only the last zero-copy chunk is watched: libzmq frees the frames of a message in
    order (the engine writes them in order; a dropped pipe is drained in order) and
    pyzmq's gc thread handles the frees in order, so the last release implies all.
    Measured: one finalizer per 1 MiB chunk cost ~0.5 ms per 64 MiB message.

    Returns:
        None when every frame is small enough to be copied.
    """
    for f in reversed(frames):
        if isinstance(f, np.ndarray) and f.nbytes >= COPY_THRESHOLD:
            done = Completion(loop, 1)
            done.watch(f)
            return done
    return None


def track_copy(frames: list[Any], loop: asyncio.AbstractEventLoop) -> tuple[list[Any], Completion]:
    """Frames to send with ``copy=True`` whose departure is still observable.

    The last frame is copied into a private array sent zero-copy and watched, so
    :meth:`Endpoint.flush` can tell when the message has left. ~50 us per message
    (a trip through pyzmq's gc thread): fine for heartbeats, too much for bulk.
    """
    tail = np.array(memoryview(frames[-1]).cast("B"), dtype=np.uint8)
    done = Completion(loop, 1)
    done.watch(tail)
    return [*frames[:-1], zmq.Frame(tail, copy=False, copy_threshold=0)], done


async def term_off_loop(ctx: zmq.asyncio.Context) -> None:
    """``ctx.term()`` in a short-lived thread (it blocks while sockets linger)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            ctx.term()
        finally:
            try:
                loop.call_soon_threadsafe(finish)
            except RuntimeError:  # loop already closed
                pass

    thread = threading.Thread(target=run, name="p2ptrain-zmq-term", daemon=True)
    thread.start()
    await done
    thread.join()


