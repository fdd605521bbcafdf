"""The dashboard's ring traffic: members tell a watching member how they are doing.

Two message kinds, both plain msgpack maps on the ring's own endpoint:

- ``dash.want`` {v, for}: "send me your status for the next ``for`` seconds"; a member
  serving a page sends it to every other member of its view every :data:`WANT_EVERY_S`
  seconds and at once to a member that joins.
- ``dash.status`` (a :class:`~p2ptrain.dashboard._report.Report`): sent once every
  ``interval`` seconds (1 s by default) to each member whose ``dash.want`` has not run
  out, at most :data:`~p2ptrain.dashboard._report.MAX_REPORT_BYTES` bytes.

So nothing is sent while nobody watches, a watcher gets one message per member per
second, and every member can serve the page for the whole ring. The router admits
these messages only from members of the current view (an outsider cannot fill the
queues); each report is checked by :meth:`RingStatus.apply` and a bad one is dropped and
counted. One :class:`StatusShare` per node: it takes the node's two subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from p2ptrain._errors import P2PTrainError, worth_logging
from p2ptrain.dashboard._report import JobInfo
from p2ptrain.dashboard._state import RingStatus
from p2ptrain.ring import Node, View

__all__ = ["StatusShare", "chain_hook", "within"]

logger = logging.getLogger(__name__)

WANT, STATUS = "dash.want", "dash.status"
WANT_EVERY_S = 2.0  # a watcher repeats its ask; a member that missed one (joined late) hears the next
WANT_FOR_S = 5.0  # and an ask runs out after this, so a watcher that closed costs nothing for long
MAX_WANT_FOR_S = 10.0


async def within(aw: Awaitable[Any], timeout: float) -> bool:
    """Await ``aw`` for at most ``timeout`` seconds; False (and ``aw`` cancelled) when it did not finish.

    Unlike :func:`asyncio.wait_for` on Python 3.10/3.11, a cancellation of the caller
    that races with ``aw`` finishing is never swallowed (closing must not hang).
    """
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        return False
    task.result()  # its error, if any
    return True


def chain_hook(first: Callable[[Any], Any] | None, then: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A callback that calls ``first`` (the host's, if any) and then ``then``; an error in ``then`` is logged, never raised."""

    def both(arg: Any) -> Any:
        out = first(arg) if first is not None else None
        try:
            then(arg)
        except Exception:  # the dashboard must never stop a training step
            logger.exception("dashboard hook failed")
        return out

    return both


class StatusShare:
    """This member's side of the dashboard's ring traffic, and its :class:`RingStatus`.

    An async context manager; closing twice is safe.

    Args:
        node: a started node.
        jobs: the node's :class:`p2ptrain.JobService`; its ``on_step`` and ``on_plan``
            hooks are chained (the host's own hooks still run first). Attach before the
            first job starts, or call :meth:`attach` later.
        interval: seconds between two reports to a watcher.
        power: this device's power class; by default the energy profile guessed for it.
    """

    def __init__(self, node: Node, jobs: Any = None, *, interval: float = 1.0, power: str | None = None) -> None:
        self.node = node
        self.interval = interval
        self.status = RingStatus(node.node_id, power=power or "")
        self._power = power
        self._watchers: dict[str, float] = {}  # member -> monotonic time its ask runs out
        self._watching = False
        self._jobs: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self.publish_errors = 0  # rounds of _publish that raised (logged)
        self.changed = asyncio.Event()  # set when something the page shows changed (a view, a report)
        if jobs is not None:
            self.attach(jobs)

    async def __aenter__(self) -> StatusShare:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def attach(self, jobs: Any) -> None:
        """Follow the steps and plans of ``jobs`` (a :class:`p2ptrain.JobService`) by chaining its hooks."""
        self._jobs = jobs
        jobs.on_step = chain_hook(jobs.on_step, self._on_step)
        jobs.on_plan = chain_hook(jobs.on_plan, self.status.on_plan)

    async def start(self) -> None:
        """Subscribe to the two message kinds and start reporting (to watchers only)."""
        if self._tasks or self._closed:
            return
        if self._power is None:
            self.status.set_power(await asyncio.get_running_loop().run_in_executor(None, _power_class))
        wants, reports = self.node.subscribe(WANT, maxsize=64), self.node.subscribe(STATUS, maxsize=64)
        self.status.on_view(self.node.view.members, self.node.view.epoch)
        name = self.node.node_id
        self._tasks = [asyncio.create_task(self._take_wants(wants), name=f"p2ptrain-dash-want-{name}"),
                       asyncio.create_task(self._take_reports(reports), name=f"p2ptrain-dash-status-{name}"),
                       asyncio.create_task(self._follow_views(), name=f"p2ptrain-dash-views-{name}"),
                       asyncio.create_task(self._publish(), name=f"p2ptrain-dash-send-{name}")]

    async def close(self) -> None:
        """Stop sending and receiving. Idempotent."""
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def watch(self, on: bool = True) -> None:
        """Ask (or stop asking) the other members for their status: this member serves a page."""
        self._watching = on
        self._wake.set()

    @property
    def watchers(self) -> list[str]:
        """Members whose ask for this member's status has not run out."""
        now = time.monotonic()
        return sorted(m for m, until in self._watchers.items() if until > now)

    # --- inputs ----------------------------------------------------------------------------

    def _on_step(self, m: Any) -> None:
        trainer = getattr(self._jobs, "last_trainer", None)
        manifest = getattr(trainer, "manifest", None) or {}
        spec = manifest.get("job") if isinstance(manifest, dict) else None
        job = JobInfo.from_spec(str(getattr(trainer, "job", "") or ""), spec) if isinstance(spec, dict) else None
        view = getattr(trainer, "view", None)
        members = list(view.members) if isinstance(view, View) else list(self.node.view.members)
        self.status.on_step(m, job=job, members=members)
        timeline = getattr(trainer, "timeline", None)
        if isinstance(timeline, list):
            self.status.set_timeline(list(timeline))
        self.changed.set()

    async def _take_wants(self, q: asyncio.Queue[Any]) -> None:
        while True:
            msg = await q.get()
            meta = msg.meta if isinstance(msg.meta, dict) else {}
            span = meta.get("for")
            if meta.get("v") != 1 or isinstance(span, bool) or not isinstance(span, (int, float)) or not 0 <= span <= MAX_WANT_FOR_S:
                self.status.stats["malformed"] += 1
                continue
            first = msg.sender not in self.watchers
            self._watchers[msg.sender] = time.monotonic() + span
            if first:
                self._wake.set()  # the first report goes out now, not at the next tick

    async def _take_reports(self, q: asyncio.Queue[Any]) -> None:
        while True:
            msg = await q.get()
            if self.status.apply(msg.sender, msg.meta):
                self.changed.set()

    async def _follow_views(self) -> None:
        async for view in self.node.views():
            self.status.on_view(view.members, view.epoch, left=self.node.membership.left())
            for m in [m for m in self._watchers if m not in view]:
                del self._watchers[m]
            self._wake.set()  # ask new members at once
            self.changed.set()

    # --- output ----------------------------------------------------------------------------

    async def _publish(self) -> None:
        asked: dict[str, float] = {}  # member -> when this member last asked it for reports
        sent: dict[str, float] = {}  # watcher -> when it last got a report
        while True:
            await within(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                self._publish_once(asked, sent)
            except Exception:  # a bug must not stop this member's reports for good
                self.publish_errors = n = self.publish_errors + 1
                if worth_logging(n):
                    logger.exception("sharing this member's status failed (%d so far)", n)

    def _publish_once(self, asked: dict[str, float], sent: dict[str, float]) -> None:
        """Ask the members for reports and send this member's to its watchers, as due."""
        now = time.monotonic()
        view = self.node.view
        self.status.set_state(self.node.state.value)
        if self._watching:
            for m in view.members:
                if m != self.node.node_id and now - asked.get(m, -WANT_EVERY_S) >= WANT_EVERY_S:
                    if self._send(m, WANT, view, {"v": 1, "for": WANT_FOR_S}):
                        asked[m] = now
        targets = [m for m in self.watchers if m in view and m != self.node.node_id]
        if targets:
            self._refresh_timeline()
            report = self.status.local_report().to_wire()
            for m in targets:
                if now - sent.get(m, -self.interval) >= 0.9 * self.interval:  # at most one a second each
                    if self._send(m, STATUS, view, report):
                        sent[m] = now
        for d in (asked, sent):
            for m in [m for m in d if m not in view]:
                del d[m]

    def _refresh_timeline(self) -> None:
        trainer = getattr(self._jobs, "last_trainer", None)
        timeline = getattr(trainer, "timeline", None)
        if isinstance(timeline, list) and timeline:
            self.status.set_timeline(list(timeline))

    def _send(self, peer: str, kind: str, view: View, meta: dict[str, Any]) -> bool:
        try:
            return self.node.endpoint.try_send(peer, kind, epoch=view.epoch, meta=meta)
        except P2PTrainError as exc:  # a member the endpoint no longer knows (it just left)
            logger.debug("dashboard %s to %s not sent: %s", kind, peer, exc)
            return False


def _power_class() -> str:
    """This device's energy profile name (a sysfs read or two), or ``""`` when it cannot be told."""
    try:
        from p2ptrain.energy import choose_profile

        choice = choose_profile()
        return choice.profile.name + (" (guessed)" if choice.guessed else "")
    except Exception:  # a strange device tree must not stop the share
        return ""
