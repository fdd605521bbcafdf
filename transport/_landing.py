"""Receive into the destination: an expected tensor's frames land straight in the caller's tensor.

Why: a ring all-reduce knows, before a piece arrives, which member sends it, under which
tag, and which region of its tensor it is for. Received the ordinary way, a piece is
copied from ZeroMQ's message into a pooled block, then added (reduce-scatter) or copied
again (all-gather) into that region: two passes over every byte where one will do.
Measured here, 64 MiB over 4 processes on 2 cores: the pooled copy and the all-gather
copy together were ~75 ms of a 215 ms all-reduce.

How: the consumer arms a :class:`Landing` for ``(kind, epoch, tag)`` with
:meth:`BaseEndpoint.expect`. When the reader decodes an envelope with that key, from that
sender, carrying exactly one tensor of the landing's dtype and shape with the ``none``
codec, it takes the frames without copying (:func:`read_frames`; ZeroMQ's own messages)
and :func:`land_frames` adds them into the destination or copies them there, off the
event loop for anything but small pieces. Nothing touches the destination until every
frame has arrived and has the declared length: a malformed message is dropped and
counted like any other, and its landing stays armed. A message that does not match
(another shape, a lossy codec, another sender) takes the ordinary path and its consumer
validates it as before. The delivered :class:`Message` has ``landed`` set to the
destination and no tensors.

A landing is claimed at most once: a duplicate of a landed message takes the ordinary
path. Landings are bounded in number (:class:`Landings`), and the consumer must
:meth:`~BaseEndpoint.forget` the ones it no longer waits for (a collective does so when
it ends, however it ends).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from p2ptrain._errors import ConfigError

from ._envelope import Envelope, rejected

__all__ = ["Landing", "Landings", "land_frames", "read_frames"]

#: Pieces of at most this many bytes are landed on the loop: the hand-off to the codec
#: thread (submit, wake-up, result back) costs the loop more than adding 1 MiB does
#: (~25 us here in cache; some hundreds from cold memory on a slow core). A gradient
#: bucket closes once it holds 4 MiB (a little more), so its pieces are about 1 MiB over
#: four members, 1.3 over three and 2 over two. Measured, 64 MiB in 4 MiB buckets over
#: four loopback members: 0.17 s landing them here against 0.25 s handing them off
#: (docs/performance.md). Larger pieces (up to 4 MiB) go to the codec thread.
INLINE_BYTES = 2 << 20


class Landing(NamedTuple):
    """Where one expected message's tensor goes.

    Attributes:
        sender: the only peer whose message may land here.
        into: a contiguous CPU tensor; the payload must have its dtype and shape.
        add: True adds the payload into ``into``; False copies it there.
    """

    sender: str
    into: torch.Tensor
    add: bool


def _frozen(tag: Any) -> Hashable:
    if isinstance(tag, (list, tuple)):
        return tuple(_frozen(t) for t in tag)
    return tag  # type: ignore[no-any-return]


class Landings:
    """The armed landings of one endpoint, by ``(kind, epoch, tag)``. Loop thread only.

    Args:
        max_armed: landings armed at once at most (a bound on this table, not on memory:
            destinations are the consumer's own tensors).
    """

    def __init__(self, max_armed: int = 4096) -> None:
        self._max = max_armed
        self._armed: dict[Hashable, Landing] = {}
        self.landed = 0

    def __len__(self) -> int:
        return len(self._armed)

    def arm(self, kind: str, epoch: int, tag: Any, landing: Landing) -> None:
        """Expect ``(kind, epoch, tag)`` from ``landing.sender`` into ``landing.into``.

        Raises:
            ConfigError: ``into`` is not a contiguous CPU tensor, or too many are armed.
        """
        t = landing.into
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
            raise ConfigError("a landing needs a contiguous CPU tensor")
        key = (kind, epoch, _frozen(tag))
        if key not in self._armed and len(self._armed) >= self._max:
            raise ConfigError(f"{len(self._armed)} landings are armed already (the limit); forget finished ones")
        self._armed[key] = landing

    def disarm(self, kind: str, epoch: int, tag: Any) -> None:
        """Forget the landing of ``(kind, epoch, tag)``, if any."""
        self._armed.pop((kind, epoch, _frozen(tag)), None)

    def claim(self, env: Envelope) -> Landing | None:
        """The landing ``env``'s message fits, taken out of the table; None when it does not fit."""
        if not self._armed:
            return None
        key = (env.kind, env.epoch, _frozen(env.tag))
        landing = self._armed.get(key)
        if landing is None or landing.sender != env.sender or len(env.tensors) != 1:
            return None
        h, into = env.tensors[0], landing.into
        if (h.codec.spec != "none" or h.dtype != into.dtype or h.shape != tuple(into.shape)
                or h.nbytes != (into.numel() * into.element_size(),) or env.frame_bytes % into.element_size()):
            return None
        del self._armed[key]
        return landing

    def rearm(self, env: Envelope, landing: Landing) -> None:
        """Put back a landing whose message was dropped before it touched the destination."""
        self._armed.setdefault((env.kind, env.epoch, _frozen(env.tag)), landing)


class RawFrames(Protocol):
    """The frames after the envelope, taken without copying."""

    def more(self) -> bool:
        """True while another frame of this message is waiting."""

    def recv_frame(self) -> Any:
        """The next frame as an object with the buffer protocol."""


def read_frames(env: Envelope, source: RawFrames) -> list[memoryview]:
    """Take every frame ``env`` declares, checking each one's length; nothing is copied.

    Raises:
        ProtocolError: missing, short, long or extra frames (``truncated``,
            ``frame_length``, ``extra_frames``); the caller drains what is left.
    """
    out: list[memoryview] = []
    for i, want in enumerate(env.frame_lengths()):
        if not source.more():
            raise rejected("truncated", f"frames end after {i} of {env.frame_count()}")
        frame = memoryview(source.recv_frame()).cast("B")
        if frame.nbytes != want:
            raise rejected("frame_length", f"frame {i} has {frame.nbytes} bytes where {want} were declared")
        out.append(frame)
    if source.more():
        raise rejected("extra_frames", f"frames follow the {len(out)} declared ones")
    return out


def land_frames(landing: Landing, frames: Sequence[memoryview], offset: int = 0) -> int:
    """Add (or copy) validated ``frames`` into ``landing.into`` from element ``offset`` on (any thread).

    Each frame holds a whole number of elements (:meth:`Landings.claim` checks the frame
    size), so no element straddles two frames.

    Returns:
        The element offset after the last frame.
    """
    flat = landing.into.view(-1)
    for frame in frames:
        if frame.readonly:  # bytes from the in-memory fake; ZeroMQ's frames are writable
            frame = memoryview(bytearray(frame))
        src = torch.frombuffer(frame, dtype=flat.dtype)
        dst = flat[offset : offset + src.numel()]
        if landing.add:
            dst.add_(src)
        else:
            dst.copy_(src)
        offset += src.numel()
    return offset
