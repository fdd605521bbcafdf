"""A job's training on one member, raced against the other members' failures.

A member whose training fails without leaving the ring (a workload error, a send that
times out) sends ``job.abort`` {error} to the others, so nobody waits on it; each stops
with a :class:`~p2ptrain.JobError` naming it. A view change needs no message: every
member sees it (a resilient job goes on in the new view and keeps listening there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from p2ptrain._errors import JobError, JobStopped, LeftOutError, MemberLostError, MembershipError, PeerFailedError, QuorumLostError
from p2ptrain.ring import Node, View, wait_ended

__all__ = ["ABORT", "guarded", "stop_when_gone", "until_closed"]

ABORT = "job.abort"


async def guarded(node: Node, job_id: str, view: View, training: asyncio.Future[Any], resilient: bool = False,
                  step_now: Callable[[], int | None] = lambda: None) -> Any:
    """``training``'s result, unless another member of the job aborts it first.

    Args:
        node: this member.
        job_id: the job (the first element of every abort's tag).
        view: the view the job started in.
        training: this member's training, already running.
        resilient: the job goes on across view changes (it recovers), so aborts are
            listened for in each new view.
        step_now: the step this member's trainer is at (None before it is built): a host
            that cancels its job stops the others as :meth:`JobService.stop` does, at that step.

    Raises:
        JobError: another member failed (named, with its error).
        Exception: this member's training failed (the others are told first).
    """
    try:
        return await _race(node, job_id, view, training, resilient, step_now)
    finally:
        # Whatever the peers sent for this job and nobody took (a failed step's pieces,
        # a duplicate abort) would sit in the bounded mailbox until the next view change.
        node.mailbox.drop_tagged(job_id)


async def _watch(node: Node, job_id: str, epoch: int, resilient: bool) -> Any:
    """The first ``job.abort`` of this job; a resilient job keeps listening across views."""
    while True:
        try:
            return await node.take(ABORT, [job_id], epoch=epoch)
        except PeerFailedError:
            if not resilient:
                raise
            if node.view.epoch == epoch:
                await node.changed()
            epoch = node.view.epoch


async def until_closed(node: Node) -> None:
    """Return once ``node`` is closed (its close wakes every view-change waiter)."""
    while not node.closed:
        await node.changed()


def _tell_others(node: Node, job_id: str, error: str, stopped: JobStopped | None = None) -> None:
    now = node.view  # after a recovery or an admission the job runs in a newer view, maybe with newcomers
    meta: dict[str, Any] = {"error": error[:1000]}
    if stopped is not None:  # on purpose: the others stop too, and say so rather than "failed"
        meta.update(stopped=stopped.step, reason=stopped.reason[:1000])
    for m in now.members:
        if m != node.node_id:
            node.endpoint.try_send(m, ABORT, epoch=now.epoch, tag=[job_id], meta=meta)


async def _race(node: Node, job_id: str, view: View, training: asyncio.Future[Any], resilient: bool,
                step_now: Callable[[], int | None]) -> Any:
    aborted = asyncio.ensure_future(_watch(node, job_id, view.epoch, resilient))
    closed = asyncio.ensure_future(until_closed(node))
    try:
        await asyncio.wait([training, aborted, closed], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the host cancelled its job: the others must not wait for this member's part
        if not node.closed:
            # On purpose, as a stop: the others end with JobStopped, not "member ... failed".
            why, step = "its host program cancelled the job there", step_now()  # relayed: "... on member X: <why>"
            _tell_others(node, job_id, f"CancelledError: {why}", None if step is None else JobStopped(why, step))
        raise
    finally:
        for fut in (training, aborted, closed):
            if not fut.done():
                fut.cancel()
    if training.done() and not training.cancelled():
        exc = training.exception()
        if exc is None:
            return training.result()
        if isinstance(exc, QuorumLostError) and exc.step is not None and not node.closed:
            # Paused: a majority that went on has moved to a newer view and drops this; members that froze
            # through the pause and woke in the same view stop as from a stop, with the model they hold.
            _tell_others(node, job_id, f"{type(exc).__name__}: {exc}", JobStopped(str(exc), exc.step))
        elif not isinstance(exc, (PeerFailedError, LeftOutError, MemberLostError)) and not node.closed and not (
                isinstance(exc, JobStopped) and exc.agreed):
            # Left out: the others went on without this member, in the view it may share with them again by now.
            # A member lost: every survivor sees it and says it (relayed, it named the survivor that saw it first).
            _tell_others(node, job_id, f"{type(exc).__name__}: {exc}", exc if isinstance(exc, JobStopped) else None)
        raise exc
    await wait_ended(training)  # let the trainer clean up (threads, tasks); a cancellation of ours goes through
    if closed.done() and not closed.cancelled():
        raise MembershipError(f"job {job_id}: this member's node was closed while the job ran")
    msg = aborted.result()  # raises PeerFailedError if the view changed instead
    meta = msg.meta if isinstance(msg.meta, dict) else {}
    if isinstance(step := meta.get("stopped"), int) and isinstance(reason := meta.get("reason"), str):
        raise JobStopped(f"job {job_id}, stopped on member {msg.sender}: {reason[:1000]}", step)
    raise JobError(f"job {job_id}: member {msg.sender} failed: {str(meta.get('error', ''))[:1000]}")


async def stop_when_gone(node: Node, submitter: str, stop: Callable[[str], object]) -> None:
    """Call ``stop(reason)`` once a job's ``submitter`` is out of ``node``'s view (run it beside the job).

    Only the submitter receives the trained model: once it has crashed or left, training on
    would spend the members' time and energy for nobody. A job that checkpoints can be
    resumed from its members' checkpoints (``p2ptrain train --resume``).
    """
    while submitter in node.view and not node.closed:
        await node.changed()
    if node.closed:
        return
    stop(f"its submitter {submitter} left the ring, so nobody would receive the model")
