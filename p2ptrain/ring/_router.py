"""Where application messages go, and what a view change does to them (no sockets here).

Application messages (collective pieces, job offers, acks...) carry the view epoch they
belong to. The router decides, for each one, whether it may be parked in the keyed
:class:`Mailbox` or a subscriber queue, and what happens to parked messages and waiters
when the view changes:

- **A member failed** (it stopped heartbeating): every waiter of the old view is woken
  with :class:`PeerFailedError` at once and the old view's messages are dropped. Work of
  that view cannot finish; recovery runs on the new view.
- **Members only left in order or joined**: a leaver's ``bye`` travels on the same
  connection after its last messages, so everything it sent is already here. The old
  view *drains*: its parked messages stay takeable and its members' in-flight messages
  are still accepted for ``drain_s`` seconds, so a collective that completed on the
  leaver completes on everyone. Waiters left after that are failed. A waiter that said
  which member its message comes from (``take(..., sender=)``) and named a leaver is
  failed at once: what the leaver sent is here, and what is not never will be (a
  pipeline's stages waited out the whole drain for an activation of a member that
  had left at a step boundary, where a kill was noticed in a tenth of the time).

Only members of the current view, members of the view being agreed (they install it a
beat before us), or members of a draining view may park messages: an outsider cannot
fill the mailbox or the job queue. Refusals are counted in ``stats`` and logged at most
once per ``_LOG_EVERY_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Any

from p2ptrain._errors import PeerFailedError
from p2ptrain.ring._mailbox import Mailbox
from p2ptrain.ring._view import View
from p2ptrain.transport import Message

__all__ = ["Router"]

logger = logging.getLogger(__name__)

_LOG_EVERY_S = 10.0  # refusals can come by the thousand: log one line per interval


class Router:
    """Application-message admission and delivery for one node.

    Args:
        stats: the node's counters; refusals are counted here by reason.
        drain_s: how long an orderly-changed view stays takeable (the node passes its
            failure timeout: longer than any in-flight message takes on a live link).
        max_pending: bound on parked messages (see :class:`Mailbox`).
    """

    def __init__(self, stats: dict[str, int], *, drain_s: float, max_pending: int = 4096) -> None:
        self.mailbox = Mailbox(max_pending)
        self.stats = stats
        self.drain_s = drain_s
        self._subs: dict[str, asyncio.Queue[Message]] = {}
        # epoch -> (view, monotonic end of its drain); several when members leave one
        # after another (a ring emptying at the end of a job)
        self._draining: dict[int, tuple[View, float]] = {}
        # member -> the epoch of the view it left in order: nothing more of that view or
        # an earlier one comes from it (kept while some view drains)
        self._gone: dict[str, int] = {}
        # a tag's head (a collective's channel) -> (the last epoch abandoned, why): see abandon()
        self._abandoned: dict[str, tuple[int, str]] = {}
        self._last_log = -_LOG_EVERY_S

    def subscribe(self, kind: str, maxsize: int) -> asyncio.Queue[Message]:
        """The bounded queue that receives every message of ``kind``."""
        q = self._subs.get(kind)
        if q is None:
            q = self._subs[kind] = asyncio.Queue(maxsize=maxsize)
        return q

    def draining(self, epoch: int) -> bool:
        """Whether messages of ``epoch`` (an older view) may still be taken."""
        entry = self._draining.get(epoch)
        return entry is not None and time.monotonic() < entry[1]

    def route(self, msg: Message, view: View, agreeing: Collection[str]) -> None:
        """Park ``msg`` or refuse it. Runs on the loop thread.

        Args:
            view: the node's current view.
            agreeing: the members of the view being agreed (the node's proposal).
        """
        if msg.epoch == view.epoch:
            admitted = msg.sender in view
        elif msg.epoch == view.epoch + 1:
            admitted = msg.sender in agreeing
        elif msg.epoch < view.epoch:
            if not (self.draining(msg.epoch) and msg.sender in self._draining[msg.epoch][0]):
                self._count("dropped_old_epoch")
                return
            admitted = True
        else:
            admitted = False
        if not admitted:
            self._refuse("dropped_not_member", msg)
            return
        q = self._subs.get(msg.kind)
        if q is None:
            if not self.mailbox.deliver(msg):
                self._refuse("mailbox_full", msg)
        elif q.full():
            self._refuse("subscriber_full", msg)
        else:
            q.put_nowait(msg)

    async def take(self, kind: str, epoch: int, tag: Any, view: View, sender: str | None = None) -> Message:
        """Wait for ``(kind, epoch, tag)`` of the current or a draining view.

        Args:
            sender: the member the message comes from, when the caller knows: if it left
                in order, only a message already here is handed out.

        Raises:
            PeerFailedError: the epoch is neither current nor draining, the view
                changed in a way that fails it while waiting, or ``sender`` left the
                ring without sending it.
        """
        if epoch != view.epoch and not self.draining(epoch):
            # A message parked before the change is still handed out while it drains.
            raise PeerFailedError(f"view moved from epoch {epoch} to {view.epoch}")
        ended = _left_without(sender, epoch) if sender is not None and epoch <= self._gone.get(sender, -1) else None
        if ended is None and (mark := self._abandoned.get(_head(tag))) is not None and epoch <= mark[0]:
            ended = mark[1]
        if ended is not None:
            msg = self.mailbox.take_held(kind, epoch, tag)
            if msg is None:
                raise PeerFailedError(ended)
            return msg
        return await self.mailbox.take(kind, epoch, tag, sender)

    def abandon(self, head: str, epoch: int, why: str) -> int:
        """End every wait, now and to come, for messages tagged ``[head, ...]`` of views up to ``epoch``.

        The caller knows what the router cannot: that the work those messages belong to cannot
        finish (a data-parallel step after the ring changed under it). A member of a collective's
        ring waiting on a *live* neighbour, itself waiting on a leaver, would otherwise sit out
        the drain. Held messages are still handed out. Returns how many waits ended.
        """
        self._abandoned[head] = (max(epoch, self._abandoned.get(head, (-1, ""))[0]), why)
        return self.mailbox.fail_where(lambda e, tag: e <= epoch and _head(tag) == head, PeerFailedError(why))

    def on_view(self, old: View, new: View, failed: Collection[str]) -> None:
        """Apply a view change: drain ``old`` if nobody in it failed, else fail its waiters."""
        dead = sorted(set(failed) & set(old.members))
        if dead:
            error = PeerFailedError(f"view changed from epoch {old.epoch} to {new.epoch}: {', '.join(dead)} failed")
            self.mailbox.fail(error, before=new.epoch)
            self._draining.clear()
            self._gone.clear()
            self._abandoned.clear()
            self._count("dropped_old_epoch", self.mailbox.drop_before(new.epoch))
        else:
            self._draining[old.epoch] = (old, time.monotonic() + self.drain_s)
            leavers = set(old.members) - set(new.members)
            for m in leavers:
                self._gone[m] = old.epoch
            if leavers:
                who = ", ".join(sorted(leavers))
                self.mailbox.fail_from(leavers, PeerFailedError(_left_without(who, old.epoch)), up_to=old.epoch)
            self.expire()

    def expire(self, view: View | None = None) -> None:
        """End drains whose time is up: fail their waiters, drop their messages."""
        now = time.monotonic()
        for epoch in sorted(e for e, (_, until) in self._draining.items() if now >= until):
            del self._draining[epoch]
        oldest_live = min(self._draining, default=None)
        if oldest_live is None:  # no view of theirs drains: a take of it fails on its epoch alone
            self._gone.clear()
            self._abandoned.clear()
        # Everything older than the oldest view still draining (or than the current view) is over.
        horizon = oldest_live if oldest_live is not None else (view.epoch if view is not None else None)
        if horizon is not None:
            stale = PeerFailedError(f"views before {horizon} ended: their messages did not all arrive")
            self.mailbox.fail(stale, before=horizon)
            self._count("dropped_old_epoch", self.mailbox.drop_before(horizon))

    def pause(self, error: PeerFailedError) -> None:
        """This node lost its quorum: every waiter fails, nothing drains."""
        self.mailbox.fail(error)
        self._draining.clear()
        self._gone.clear()
        self._abandoned.clear()

    def _count(self, reason: str, n: int = 1) -> None:
        if n:
            self.stats[reason] = self.stats.get(reason, 0) + n

    def _refuse(self, reason: str, msg: Message) -> None:
        self._count(reason)
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning("refused %s from %s (epoch %d): %s; counts so far: %s", msg.kind, msg.sender, msg.epoch, reason,
                           {k: v for k, v in self.stats.items() if k in ("dropped_not_member", "mailbox_full", "subscriber_full")})


def _head(tag: Any) -> Any:
    """The first element of a list tag (a collective's channel), else None."""
    return tag[0] if isinstance(tag, (list, tuple)) and tag else None


def _left_without(who: str, epoch: int) -> str:
    return f"{who} left the ring in order (view {epoch}) without sending this message: its part of that view is over"
