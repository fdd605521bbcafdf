"""Answering offers and invitations: one job at a time per member, and a busy member says so at once.

A member is *busy* from the moment it takes a job (its own submitted one, an offer it
serves, an invitation into a running job) until that job ends here. Offers and
invitations that reach a busy member are refused at once, naming the job it is busy
with. Before, they waited:

- two ``p2ptrain train`` commands started together each waited 120 s (the answer
  timeout) for the other to answer its offer, because a submitter never read offers;
- an offer made while another job ran waited behind it, past its submitter's patience,
  and then ran stale against members that had given up on it;
- a ``train`` that joined the ring while a job ran never answered the job's invitation,
  and the job's members stood idle for the 30 s admission timeout.

:func:`serve` reads both kinds while it runs and hands a message to its worker only
while the member is free; :func:`refusing` reads them while this member submits (a
``train`` never serves). Offers and invitations wait in the node's bounded queues while
neither runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from p2ptrain._errors import (
    JobError,
    JobStopped,
    MembershipError,
    P2PTrainError,
    PeerFailedError,
    QuorumLostError,
    TransportError,
    trace_unless_ours,
)
from p2ptrain.ring import MemberState, cancel_quietly
from p2ptrain.train._abort import until_closed
from p2ptrain.train._admit import reply
from p2ptrain.train._dataparallel import TrainResult
from p2ptrain.train._job import JobSpec, submitter_of

if TYPE_CHECKING:
    from p2ptrain.train._jobs import JobService

__all__ = ["OFFER", "ACK", "NodeBusy", "StartInterrupted", "refuse", "refusing", "serve"]

_BUSY: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()  # node -> the job it is busy with


class NodeBusy:
    """:attr:`busy_with`, kept per node: every :class:`JobService` of one node shares it.

    A host that submits through ``JobService(node).submit(...)`` while another instance
    serves (the README's example beside the dashboard's) had two guards, and its member
    trained two jobs at once.
    """

    node: Any

    @property
    def busy_with(self) -> str | None:
        """The job this member has taken, from its offer to its end here (None: free)."""
        return _BUSY.get(self.node)

    @busy_with.setter
    def busy_with(self, job_id: str | None) -> None:
        if job_id is None:
            _BUSY.pop(self.node, None)
        else:
            _BUSY[self.node] = job_id

    def check_free(self) -> None:
        """Raise unless this member can take a job now: its node runs and it is not busy.

        A closed node's ``submit`` offered its job to its stale view for about 20 s, and one
        never started trained alone and reported success.

        Raises:
            MembershipError: the node is closed or was never started.
            JobError: this member is busy with another job.
        """
        if self.node.closed:
            raise MembershipError(f"node {self.node.node_id} is closed; a job needs a running node (create a new one)")
        try:
            self.node.endpoint  # noqa: B018 - raises before start()
        except P2PTrainError:
            raise MembershipError(f"node {self.node.node_id} is not started; use `async with Node(...)` or await node.start()") from None
        if self.busy_with is not None:
            raise JobError(f"{self.node.node_id} is busy with job {self.busy_with}; submit again when it is done")

logger = logging.getLogger(__name__)

OFFER, ACK = "job.offer", "job.ack"
# How long serve(once=True) waits for the submitter's next offer after an interrupted start
# (it waits for the next view, at most 3 x VIEW_GRACE, then offers again).
REOFFER_WAIT = 30.0
VIEW_GRACE = 3.0  # > failure detection + one heartbeat: views settle within this


class StartInterrupted(PeerFailedError):
    """The view changed while a job's members answered its offer: nobody trains it, and its submitter offers it again."""


def _job_id(msg: Any) -> str | None:
    meta = msg.meta if isinstance(msg.meta, dict) else {}
    job_id = meta.get("id")
    return job_id if isinstance(job_id, str) and 0 < len(job_id) <= 200 else None


def refuse(service: JobService, job_id: str, epoch: int, error: str) -> None:
    """Tell the members of an offer's view that this member refuses it (so nobody waits); its submitter may not be in ours."""
    node = service.node
    for m in {*node.view.members, submitter_of(job_id)} - {node.node_id}:
        with contextlib.suppress(TransportError):  # a submitter this node never heard from
            node.endpoint.try_send(m, ACK, epoch=epoch, tag=[job_id, node.node_id], meta={"ok": False, "error": error, "data": ""})


async def _decline(service: JobService, invited: bool, msg: Any, job_id: str) -> None:
    why = f"{service.node.node_id} is busy with job {service.busy_with}; submit again when it is done"
    if not invited:
        refuse(service, job_id, msg.epoch, why)
        return
    try:  # the inviting leader waits for this answer; it may have gone meanwhile
        await reply(service.node, msg.sender, msg.epoch, job_id, False, why, "")
    except Exception as exc:  # noqa: BLE001 - a lost answer costs the leader its timeout, nothing here
        logger.debug("declining %s's invitation failed: %s", msg.sender, exc)


async def _read(service: JobService, queue: asyncio.Queue[Any], invited: bool, work: asyncio.Queue[Any] | None) -> None:
    """Take every message of ``queue``: to ``work`` when this member is free (it is busy from then on), else refused."""
    while True:
        msg = await queue.get()
        job_id = _job_id(msg)
        if job_id is None:
            continue
        if service.busy_with is None and work is not None:
            service.busy_with = job_id
            work.put_nowait((invited, msg, job_id))
        elif work is not None and service.busy_with is not None and _supersedes(invited, job_id, service.busy_with):
            work.put_nowait((invited, msg, job_id))
        else:
            await _decline(service, invited, msg, job_id)


def _supersedes(invited: bool, job_id: str, busy_with: str) -> bool:
    """Whether this member's job ``busy_with`` is stale for this offer or invitation, which then waits behind it.

    - Invited into the job it runs: the job went on without this member (it was left out
      while silent), so its run ends at its next view change.
    - Offered another job by the same submitter: a submitter offers one job at a time, so it
      gave up on the first, whose start a view change interrupted here too.
    """
    if invited:
        return job_id == busy_with
    return job_id != busy_with and submitter_of(job_id) == submitter_of(busy_with)


@contextlib.asynccontextmanager
async def refusing(service: JobService, job_id: str) -> AsyncIterator[None]:
    """This member is busy with ``job_id`` (its own) inside the block; offers and invitations meanwhile are refused."""
    service.busy_with = job_id
    readers = [asyncio.ensure_future(_read(service, service._offers, False, None)),
               asyncio.ensure_future(_read(service, service._admits, True, None))]
    try:
        yield
    finally:
        service.busy_with = None
        for r in readers:
            cancel_quietly(r)


async def serve(service: JobService, once: bool) -> TrainResult | None:
    """:meth:`JobService.serve`: offers and invitations, one job at a time; None once the node closes."""
    work: asyncio.Queue[Any] = asyncio.Queue()
    tasks = [asyncio.ensure_future(_read(service, service._offers, False, work)),
             asyncio.ensure_future(_read(service, service._admits, True, work)),
             asyncio.ensure_future(_work(service, work, once)), asyncio.ensure_future(until_closed(service.node))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Taken but never started (an offer that waited behind the job serve(once=True) just
        # ran): this member is free of it again, and it goes back to its queue for the next
        # serve(). Dropped, it cost its submitter a two-minute wait for an answer.
        back: dict[bool, list[Any]] = {False: [], True: []}
        while not work.empty():
            invited, msg, job_id = work.get_nowait()
            if service.busy_with == job_id:
                service.busy_with = None
            back[invited].append(msg)
        _put_back(service._offers, back[False])
        _put_back(service._admits, back[True])


def _put_back(queue: asyncio.Queue[Any], msgs: list[Any]) -> None:
    """``msgs``, taken from ``queue`` and not acted on, back at its front (in order)."""
    if not msgs:
        return
    rest = []
    while not queue.empty():
        rest.append(queue.get_nowait())
    for msg in [*msgs, *rest]:
        try:
            queue.put_nowait(msg)
        except asyncio.QueueFull:  # it filled meanwhile: the newest go, as the router drops them
            logger.warning("dropped a job message from %s: this member's queue is full", getattr(msg, "sender", "?"))


async def _work(service: JobService, work: asyncio.Queue[Any], once: bool) -> TrainResult | None:
    interrupted: StartInterrupted | None = None  # with ``once``: the submitter's next offer is the one job
    while True:
        try:
            invited, msg, job_id = await asyncio.wait_for(work.get(), None if interrupted is None else REOFFER_WAIT)
        except asyncio.TimeoutError:
            assert interrupted is not None
            raise interrupted from None  # no second offer came (its submitter paused, gave up or does not retry)
        service.busy_with = job_id  # also an invitation queued behind this member's stale run of the same job
        try:
            if invited:
                res = await service._join_running(msg)
                if res is None:
                    continue
            else:
                try:
                    spec: JobSpec | None = JobSpec.from_wire(msg.meta.get("job"))
                    err = None
                except JobError as exc:  # refused with its reason, so nobody waits for this member
                    spec, err = None, str(exc)
                res = await service._accept_and_run(job_id, spec, msg.epoch, early_error=err)
            if once:
                return res
        except StartInterrupted as exc:  # never started: not the one job of ``once``; its submitter offers it again
            logger.warning("%s", exc)
            interrupted = exc if once else None
        except Exception as exc:  # ours in a line; the host's hook, the workload or a bug with a traceback
            if once:
                raise
            # On purpose, by a member, or the ring went on without this member: not a failure of the job.
            stopped = isinstance(exc, (JobStopped, MembershipError))
            what = "the job %s invited this member to" if invited else f"job %s from {msg.sender}"
            said = str(exc).removeprefix(f"job {job_id}, ").removeprefix(f"job {job_id}: ")  # the id once per line
            (logger.warning if stopped else logger.error)(f"{what} %s: %s", job_id, "stopped" if stopped else "failed", said,
                                                          exc_info=trace_unless_ours(exc))
        finally:
            service.busy_with = None


async def until(node: Any, cond: Callable[[], bool]) -> None:
    """Return once ``cond()`` holds, checking it at each of ``node``'s view changes."""
    while not cond():
        await node.changed()


async def view_after(node: Any, old: Any) -> None:
    """After an interrupted start: wait for the view after ``old`` (bounded), unless this member paused."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(until(node, lambda: node.view.epoch > old.epoch or node.state is MemberState.PAUSED),
                               3 * VIEW_GRACE)
    if node.state is MemberState.PAUSED:
        raise QuorumLostError(f"{node.node_id} lost the majority of view {node.view.epoch} while its job was "
                              "starting; nothing was trained")
