"""Going on after a member is lost: data parallelism, where every replica holds the state.

When a member crashes, is cut off or leaves, the survivors that hold a majority agree a
new view (the ring does that). Each survivor then:

1. waits for that view (a member on the minority side pauses and leaves the job with
   :class:`QuorumLostError`, and one the others went on without while it was silent, a
   frozen or suspended process, with :class:`LeftOutError`; either is invited back once
   it is in the ring again);
2. trains on with the members of the new view that were in the job, and the members
   that joined the ring and accepted the job (:mod:`p2ptrain.train._admit`);
3. all-gathers every survivor's next step (the first step it has not applied). A
   failure can land after some survivors applied a step and before others did, so they
   may differ by one;
4. the survivor that got furthest (lowest rank on a tie) broadcasts its parameters and
   optimizer state as one safetensors blob (the whole model as unit 0, see
   :mod:`p2ptrain.train._state`) to the others (skipped when all agree), and
   everyone continues from that step.

No step is redone and none is skipped: the data order is a function of the global
step, and the global batch is split evenly over the survivors, so the mean gradient of
every step is that of the same samples as in a fault-free run. Lossy codecs restart
their error-feedback residuals on the new ring (what was still owed is lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from p2ptrain._errors import JobError, JobStopped, LeftOutError, MembershipError, PeerFailedError, QuorumLostError
from p2ptrain.ring import Collectives, MemberState, Node, View
from p2ptrain.train._admit import carried_over
from p2ptrain.train._job import submitter_of
from p2ptrain.train._state import apply, capture, pack_units_tensor, unpack_units_tensor

if TYPE_CHECKING:
    from p2ptrain.train._dataparallel import DataParallelTrainer

__all__ = ["Recovery", "align", "next_view", "recover_replicas"]

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 5  # a second failure during recovery starts it again, a few times at most


@dataclass(frozen=True)
class Recovery:
    """One recovery as this member saw it.

    Attributes:
        old_epoch: the view the job was running in.
        new_epoch: the view it goes on in.
        members: the job's members from now on.
        resume_step: the step training goes on from.
        source: the member whose state everyone took (``""`` when all agreed already).
        wait_s: from the failure surfacing here to the new view being installed.
        total_s: from the failure surfacing here to being ready to train.
        cause: what stopped the step.
    """

    old_epoch: int
    new_epoch: int
    members: tuple[str, ...]
    resume_step: int
    source: str
    wait_s: float
    total_s: float
    cause: str


async def next_view(node: Node, old: View, timeout: float, job: str = "", step: int | None = None) -> View:
    """The first view after ``old`` in which ``node`` is active, within ``timeout`` seconds.

    ``job`` (its id) and ``step`` (the first step not applied here): when the job's
    submitter is the member lost, there is nobody to recover for.

    Raises:
        JobStopped: ``job``'s submitter is not in the new view (the job stops everywhere).
        QuorumLostError: ``node`` paused (it is on the minority side): the majority goes
            on without it, so it leaves the job at once. Once the partition heals it
            rejoins the ring as a newcomer, and the job invites it back in.
        LeftOutError: the others installed a view after ``old`` without ``node`` (it was
            silent past the failure timeout: frozen, suspended): its part is stale, and the
            job invites it back in as a newcomer.
        PeerFailedError: no new view was agreed in time.
        MembershipError: ``node`` was closed.
    """
    deadline = time.monotonic() + timeout
    while True:
        if node.closed:  # no view comes now: a host that closed its node mid-job waited out the timeout (30 s)
            raise MembershipError(f"{node.node_id} was closed during the job, so it stopped training")
        if node.state is MemberState.PAUSED:
            raise QuorumLostError(f"{node.node_id} lost the majority of view {old.epoch} (half or more of its "
                                  f"{len(old)} members unreachable), so it paused and stopped training", step)
        if (dropped := node.membership.left_out) > old.epoch:
            raise LeftOutError(f"the ring went on without {node.node_id} in view {dropped} (it was silent for longer than "
                               f"the failure timeout: frozen, suspended or cut off), so its part of the job from view "
                               f"{old.epoch} is stale and it stopped training")
        if node.view.epoch > old.epoch:
            submitter = submitter_of(job)
            if job and submitter not in node.view and submitter in old:
                raise JobStopped(f"its submitter {submitter} left the ring, so nobody would receive the model", step or 0)
            return node.view
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerFailedError(f"no new view agreed within {timeout:.0f}s after view {old.epoch} failed")
        try:
            await asyncio.wait_for(node.changed(), left)
        except asyncio.TimeoutError:
            pass


async def recover_replicas(trainer: DataParallelTrainer, cause: PeerFailedError) -> Recovery:
    """Move ``trainer`` onto the survivors' view with everyone's state at the same step.

    Raises:
        QuorumLostError: this member is on the minority side.
        JobError: the job cannot be split over the survivors (``trainer.cannot_train_on``).
        PeerFailedError: no view was agreed in time, or failures kept coming.
    """
    t0 = time.monotonic()
    error: PeerFailedError = cause
    for _ in range(_MAX_ATTEMPTS):
        new = await next_view(trainer.node, trainer.view, max(0.0, t0 + trainer.recover_timeout - time.monotonic()),
                              trainer.job, trainer.next_step)
        waited = time.monotonic() - t0
        old = trainer.view
        if trainer.admit is not None:  # newcomers in the view may be asked into the job
            try:
                survivors, _ = await trainer.admit(old, new)
            except PeerFailedError as exc:
                error = exc
                continue
        else:
            survivors = View(new.epoch, tuple(carried_over(trainer.node, old, new)))
        if trainer.node.node_id not in survivors:
            raise PeerFailedError(f"{trainer.node.node_id} is no longer in the ring (view {new.epoch})")
        refusal = trainer.cannot_train_on(survivors)
        if refusal is not None:
            raise JobError(f"{refusal}; the job cannot go on")
        trainer.rebind(survivors)
        try:
            source = await align(trainer)
        except PeerFailedError as exc:  # another change during recovery: start over on the next view
            error = exc
            continue
        rec = Recovery(old.epoch, new.epoch, survivors.members, trainer.next_step, source, waited,
                       time.monotonic() - t0, str(cause))
        logger.warning("job %s recovered: view %d -> %d, %d members, resuming after %d steps%s", trainer.job or "-",
                       old.epoch, new.epoch, len(survivors), rec.resume_step, f" from {source}'s state" if source else "")
        return rec
    raise error


async def align(trainer: DataParallelTrainer) -> str:
    """Everyone at the furthest member's step and state; returns that member ("" if all agreed)."""
    coll: Collectives = trainer.coll
    view = trainer.view
    me = trainer.node.node_id
    steps = [int(t[0]) for t in await coll.all_gather(torch.tensor([trainer.next_step], dtype=torch.int64))]
    target = max(steps)
    if all(s == target for s in steps):
        return ""
    source = view.members[steps.index(target)]
    size = torch.zeros(1, dtype=torch.int64)
    buf = torch.empty(0, dtype=torch.uint8)
    if me == source:
        buf = await asyncio.get_running_loop().run_in_executor(
            None, lambda: pack_units_tensor({0: capture(trainer.named, trainer.opt)}, trainer.next_step))
        size[0] = buf.numel()
    await coll.broadcast(size, source)
    if me != source:
        buf = torch.empty(int(size[0]), dtype=torch.uint8)
    await coll.broadcast(buf, source)
    if me != source:
        step, units = await asyncio.get_running_loop().run_in_executor(
            None, unpack_units_tensor, buf, f"state from {source}")
        if 0 not in units:
            raise JobError(f"{source} sent no model state")
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: apply(units[0], trainer.named, trainer.opt, f"state from {source}"))
        trainer.next_step = step
    return source
