"""Keyed delivery of application messages: a collective waits for exactly the message it needs.

Ring collectives address messages by ``(kind, epoch, tag)``. Peers run ahead of each
other by a step or two, so a message may arrive before anyone waits for it; it is held
(bounded in count) until taken. Waiters are woken with an error when the view changes
under them, so a dead peer surfaces as :class:`PeerFailedError` within the failure
detection time instead of a hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Hashable
from typing import Any

from p2ptrain._errors import PeerFailedError, ProtocolError
from p2ptrain.transport import Message

__all__ = ["Mailbox", "freeze_tag"]

def freeze_tag(tag: Any, _depth: int = 0) -> Hashable:
    """A hashable form of a msgpack tag (lists become tuples).

    Raises:
        ProtocolError: the tag nests too deep or holds a map.
    """
    if isinstance(tag, (list, tuple)):
        if _depth > 4 or len(tag) > 16:
            raise ProtocolError("message tag nests too deep or is too long")
        return tuple(freeze_tag(t, _depth + 1) for t in tag)
    if tag is None or isinstance(tag, (int, float, str, bytes, bool)):
        return tag
    raise ProtocolError(f"message tag of type {type(tag).__name__} is not allowed")


class Mailbox:
    """Messages held by key until a waiter takes them.

    Args:
        max_pending: messages held without a waiter before new ones are refused
            (counted in ``overflow``); a correct ring collective never comes close,
            since each peer waits for its predecessor every step.
    """

    def __init__(self, max_pending: int = 4096) -> None:
        self._max = max_pending
        self._held: dict[Hashable, Message] = {}
        self._waiters: dict[Hashable, asyncio.Future[Message]] = {}
        self._senders: dict[Hashable, str] = {}  # key -> the member a waiter expects it from, when it said
        self.overflow = 0
        self.duplicates = 0

    @staticmethod
    def key(kind: str, epoch: int, tag: Any) -> Hashable:
        """The delivery key of a message."""
        return (kind, epoch, freeze_tag(tag))

    def deliver(self, msg: Message) -> bool:
        """Hand ``msg`` to its waiter or hold it; False when it was refused (full). Runs on the loop thread."""
        k = self.key(msg.kind, msg.epoch, msg.tag)
        fut = self._waiters.pop(k, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)
            return True
        if k in self._held:
            self.duplicates += 1
            return True
        if len(self._held) >= self._max:
            self.overflow += 1
            return False
        self._held[k] = msg
        return True

    async def take(self, kind: str, epoch: int, tag: Any, sender: str | None = None) -> Message:
        """Wait for the message with this key.

        Args:
            sender: the member it comes from, when the caller knows: :meth:`fail_from`
                then wakes this waiter when that member is gone.

        Raises:
            PeerFailedError: :meth:`fail` or :meth:`fail_from` was called (the view
                changed) while waiting.
        """
        k = self.key(kind, epoch, tag)
        msg = self._held.pop(k, None)
        if msg is not None:
            return msg
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters[k] = fut
        if sender is not None:
            self._senders[k] = sender
        try:
            return await fut
        finally:
            self._waiters.pop(k, None)
            self._senders.pop(k, None)

    def take_held(self, kind: str, epoch: int, tag: Any) -> Message | None:
        """The message with this key if it is here, without waiting."""
        return self._held.pop(self.key(kind, epoch, tag), None)

    def fail_from(self, senders: Collection[str], exc: PeerFailedError, *, up_to: int) -> int:
        """Wake with ``exc`` the waiters of epochs up to ``up_to`` that expect a message from ``senders``.

        Returns:
            How many were woken.
        """
        woken = 0
        for k, who in list(self._senders.items()):
            fut = self._waiters.get(k)
            if who in senders and k[1] <= up_to and fut is not None:  # type: ignore[index]
                if not fut.done():
                    fut.set_exception(exc)
                    woken += 1
                del self._waiters[k]
                del self._senders[k]
        return woken

    def fail_where(self, chosen: Callable[[int, Any], bool], exc: PeerFailedError) -> int:
        """Wake with ``exc`` the waiters whose ``(epoch, tag)`` is ``chosen``; returns how many."""
        keys = [k for k in self._waiters if chosen(k[1], k[2])]  # type: ignore[index]
        for k in keys:
            fut = self._waiters.pop(k)
            self._senders.pop(k, None)
            if not fut.done():
                fut.set_exception(exc)
        return len(keys)

    def fail(self, exc: PeerFailedError, *, before: int | None = None) -> None:
        """Wake waiters with ``exc``: all of them, or those of epochs older than ``before``."""
        for k, fut in list(self._waiters.items()):
            if before is None or k[1] < before:  # type: ignore[index]
                if not fut.done():
                    fut.set_exception(exc)
                del self._waiters[k]
                self._senders.pop(k, None)

    def drop_tagged(self, needle: str) -> int:
        """Forget held messages whose tag holds a string containing ``needle``; returns how many.

        A job that stopped mid-step leaves its peers' pieces here; they would otherwise
        stay until the next view change, filling the bounded mailbox.
        """
        def holds(tag: Any) -> bool:
            return (isinstance(tag, str) and needle in tag) or (isinstance(tag, tuple) and any(holds(t) for t in tag))

        old = [k for k in self._held if holds(k[2])]  # type: ignore[index]
        for k in old:
            del self._held[k]
        return len(old)

    def drop_before(self, epoch: int) -> int:
        """Forget held messages of epochs older than ``epoch``; returns how many."""
        old = [k for k in self._held if k[1] < epoch]  # type: ignore[index]
        for k in old:
            del self._held[k]
        return len(old)

    def __len__(self) -> int:
        return len(self._held)
