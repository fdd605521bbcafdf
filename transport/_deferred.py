"""Large messages read in two halves: their frames taken on the loop, their bytes copied in a thread.

A message of more than ``DEFER_BYTES`` (in at most ``DEFER_MAX_FRAMES`` frames) is not
copied into its receive buffers on the event loop: :func:`take_frames` takes its frames
from ZeroMQ there without a copy (refusing extra frames at once), and :func:`read_deferred`
checks their count and lengths, copies them and decodes them in the endpoint's codec
thread, in order with the other messages (the reader awaits it). Each frame is let go as
soon as it is copied. A malformed message is dropped and counted as on the loop's path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ._envelope import Envelope, rejected
from ._frames import decode_buffers, read_buffers

__all__ = ["DEFER_BYTES", "DEFER_MAX_FRAMES", "Deferred", "deferrable", "read_deferred", "take_frames"]

#: Messages of more than this many bytes are copied out of ZeroMQ's frames (and decoded)
#: in the codec thread, not on the loop: the loop only takes the frames, without a copy.
#: A 4 MiB copy is 1-2 ms here; a 180 MB recovery snapshot of a 15 M-parameter model
#: held the loop for about 100 ms. (The plan's 4 MiB link probe stays on the loop's path.)
DEFER_BYTES = 4 << 20
#: ... unless they come in more frames than this (a peer may declare 1-byte frames): such a
#: message is read on the loop as before, never held as millions of frame objects.
DEFER_MAX_FRAMES = 4096


def deferrable(env: Envelope) -> bool:
    """True when ``env``'s message is read in the codec thread (:func:`take_frames`)."""
    if env.nbytes <= DEFER_BYTES:
        return False
    return env.frame_count() <= DEFER_MAX_FRAMES


class Deferred(NamedTuple):
    """A large message's frames as ZeroMQ delivered them: read in the codec thread (``DEFER_BYTES``)."""

    frames: list[Any]


def take_frames(env: Envelope, source: Any) -> Deferred:
    """The rest of a :func:`deferrable` message as its frames, without copying (loop thread).

    Raises:
        ProtocolError: more frames than ``env`` declares (``extra_frames``; the caller
            drains the rest). Missing frames and wrong lengths are found by
            :func:`read_deferred`, as :func:`read_buffers` finds them.
    """
    limit = env.frame_count()
    frames: list[Any] = []
    while source.more():
        if len(frames) == limit:
            raise rejected("extra_frames", f"frames follow the {limit} declared ones")
        frames.append(source.recv_frame())
    return Deferred(frames)


class _TakenFrames:
    """A :class:`~p2ptrain.transport._frames.FrameSource` over a deferred message's frames,
    each let go once read: ZeroMQ's memory for the message goes back frame by frame
    while it is copied, as a socket's does."""

    writable_frames = True  # ZeroMQ's own message memory: one-frame buffers are used in place

    def __init__(self, frames: list[Any]) -> None:
        self._frames = frames
        self._i = 0

    def more(self) -> bool:
        return self._i < len(self._frames)

    def recv_frame(self) -> Any:
        frame, self._frames[self._i] = self._frames[self._i], None
        self._i += 1
        return frame

    def recv_into(self, buf: memoryview) -> int:
        frame = memoryview(self.recv_frame()).cast("B")
        n = min(len(buf), frame.nbytes)
        # numpy's copy lets go of the GIL: the host's loop thread runs meanwhile.
        np.copyto(np.frombuffer(buf, dtype=np.uint8, count=n), np.frombuffer(frame, dtype=np.uint8, count=n))
        return frame.nbytes


def read_deferred(env: Envelope, frames: list[Any], alloc: Any) -> list[torch.Tensor]:
    """Check a deferred message's frames, copy them into receive buffers and decode (codec thread)."""
    try:
        return decode_buffers(env, read_buffers(env, _TakenFrames(frames), alloc))
    finally:
        frames.clear()
