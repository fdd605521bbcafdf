"""Bringing a member that joined during a job into it, at the survivors' next recovery.

A view change pins every running job's collectives to an old view, so a join (like a
loss) makes the job's members stop at their next collective and recover
(:mod:`p2ptrain.train._recovery`, ``PipelineTrainer._recover``). When the new view
holds members the job did not have, the job's members ask them in:

1. the *leader* (the first of the job's surviving members in ring order) sends
   ``job.admit`` {id, job, members} to each newcomer;
2. a newcomer's :class:`~p2ptrain.train.JobService` checks the spec and builds the
   workload exactly as for an offer, and answers ``job.admit.ack`` {ok, error, data};
3. the leader waits for the answers (at most :data:`ADMIT_TIMEOUT`), takes the members
   that accepted with the job's data, computes the plan on them, and sends
   ``job.admitted`` {members, layout, micro} to every other survivor and to the
   newcomers it took. Everyone uses the leader's decision, so they cannot disagree.

Then every member, newcomers included, puts the state together at one step as after a
loss (a newcomer holds nothing and receives its part), and training goes on with the
newcomer. The leader is only a leader for this one decision: if it fails meanwhile, the
others see a view change and start the recovery again. A job with ``admit=False``
(``JobService(admit=False)``) never asks anyone in. A job that takes nobody mid-job (a
tensor group: its weights are split) tells each newcomer so instead
(:func:`turn_away`: ``job.admit`` {id, closed}), so that it does not sit idle unaware.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from p2ptrain._errors import JobError, TransportError
from p2ptrain.ring import Node, View, send_or_fail

__all__ = ["ADMIT", "ADMIT_TIMEOUT", "Admission", "carried_over", "decide", "reply", "turn_away"]

logger = logging.getLogger(__name__)

ADMIT, _ACK, _ADMITTED = "job.admit", "job.admit.ack", "job.admitted"
# A newcomer builds the workload (imports, first-optimizer set-up: seconds on a slow
# device) before it answers; longer than that and the job goes on without it.
ADMIT_TIMEOUT = 30.0

# The members' plan after an admission: (layout as plain data, micro-batches) or None.
Admission = tuple[View, Any]


def carried_over(node: Node, old: View, new: View) -> list[str]:
    """The members of ``new`` that were in ``old`` in the same life: one that stepped out (``JobService.leave``
    on a node kept open) or restarted since ``old`` is back as a newcomer, not as the member the job had."""
    renewed = node.membership.renewed
    return [m for m in new.members if m in old and renewed.get(m, -1) < old.epoch]


async def decide(node: Node, old: View, new: View, *, job: str, spec_wire: dict[str, Any], data: str, allow: bool,
                 fits: Callable[[int], bool], plan: Callable[[View], Any] | None,
                 extra: dict[str, Any] | None = None) -> Admission:
    """The job's members from ``new`` on, and their plan, as the leader decided (all survivors call it).

    Args:
        old: the view the job ran in; ``new``: the view after the change.
        job: the job id; ``spec_wire``: its spec as sent in the offer; ``data``: its data digest.
        allow: ask newcomers in at all.
        fits: whether the job can run on that many members (e.g. the batch splits).
        plan: members -> their plan as plain data (pipeline), or None (data parallelism).
        extra: more fields for the invitation (the planner's inputs).

    Raises:
        PeerFailedError: the view changed again (the leader failed...).
    """
    survivors = carried_over(node, old, new)
    newcomers = [m for m in new.members if m not in survivors] if allow else []
    if not newcomers:
        view = View(new.epoch, tuple(survivors))
        return view, None
    leader, me = survivors[0], node.node_id
    if me != leader:
        msg = await asyncio.wait_for(node.take(_ADMITTED, [job, new.epoch], epoch=new.epoch), ADMIT_TIMEOUT + 30)
        meta = msg.meta if isinstance(msg.meta, dict) else {}
        members = meta.get("members")
        if not (isinstance(members, list) and set(survivors) <= set(members) <= set(new.members)):
            raise JobError(f"the job's leader {leader} sent a malformed admission: {str(members)[:200]}")
        return View.of(new.epoch, members), meta.get("plan")
    invitation = {"id": job, "job": spec_wire, "members": survivors, **(extra or {})}
    sends = await asyncio.gather(*(send_or_fail(node, m, ADMIT, epoch=new.epoch, meta=invitation,
                                                timeout=ADMIT_TIMEOUT) for m in newcomers), return_exceptions=True)
    for m, sent in zip(newcomers, sends):
        if isinstance(sent, BaseException):
            logger.warning("job %s: the invitation to %s was not sent: %s: %s", job, m, type(sent).__name__, sent)

    async def answer(m: str) -> tuple[str, bool, str]:
        msg = await node.take(_ACK, [job, new.epoch, m], epoch=new.epoch)
        meta = msg.meta if isinstance(msg.meta, dict) else {}
        ok = meta.get("ok") is True and meta.get("data") == data
        return m, ok, str(meta.get("error", "") or ("" if ok else "other training data"))[:500]

    answers = await asyncio.gather(*(asyncio.wait_for(answer(m), ADMIT_TIMEOUT) for m in newcomers),
                                   return_exceptions=True)
    taken = []
    for m, a in zip(newcomers, answers):
        if isinstance(a, BaseException):
            logger.warning("job %s: %s did not answer the invitation (%s: %s); going on without it", job, m,
                           type(a).__name__, a)
        elif not a[1]:
            logger.warning("job %s: %s declined to join: %s", job, m, a[2])
        else:
            taken.append(m)
    while taken and not fits(len(survivors) + len(taken)):
        taken.pop()  # e.g. the global batch does not split over one more member
    view = View.of(new.epoch, survivors + taken)
    layout = plan(view) if plan is not None else None
    decision = {"members": list(view.members), "plan": layout}
    await asyncio.gather(*(send_or_fail(node, m, _ADMITTED, epoch=new.epoch, tag=[job, new.epoch], meta=decision,
                                        timeout=ADMIT_TIMEOUT) for m in [*survivors, *newcomers] if m != me))
    if taken:
        logger.warning("job %s: %s joined the job (view %d)", job, ", ".join(taken), new.epoch)
    return view, layout


async def reply(node: Node, leader: str, epoch: int, job: str, ok: bool, error: str, data: str) -> Admission | None:
    """A newcomer's answer to ``job.admit``, and the leader's decision; None if it was not taken."""
    await send_or_fail(node, leader, _ACK, epoch=epoch, tag=[job, epoch, node.node_id],
                       meta={"ok": ok, "error": error, "data": data}, timeout=ADMIT_TIMEOUT)
    if not ok:
        return None
    msg = await asyncio.wait_for(node.take(_ADMITTED, [job, epoch], epoch=epoch), ADMIT_TIMEOUT + 30)
    meta = msg.meta if isinstance(msg.meta, dict) else {}
    members = meta.get("members")
    if not (isinstance(members, list) and all(isinstance(m, str) for m in members)) or node.node_id not in members:
        return None
    return View.of(epoch, members), meta.get("plan")


def turn_away(node: Node, old: View, new: View, *, job: str, why: str) -> list[str]:
    """Tell the members of ``new`` that were not in ``old`` that job ``job`` takes none of them, and ``why``.

    Only the job's leader (its first member still in ``new``) sends; best effort, never
    waits (a newcomer that misses it only goes without the word). Returns whom it told.
    """
    survivors = carried_over(node, old, new)
    if not survivors or survivors[0] != node.node_id:
        return []
    told = []
    for m in (m for m in new.members if m not in survivors):
        try:
            if node.endpoint.try_send(m, ADMIT, epoch=new.epoch, meta={"id": job, "closed": why[:500]}):
                told.append(m)
        except TransportError as exc:  # a lost word costs the newcomer its notice, nothing here
            logger.debug("job %s: telling %s it is not taken in failed: %s", job, m, exc)
    return told
