"""Putting a consistent training state together from the copies the members hold.

Used after a member is lost (pipeline and hybrid jobs) and to resume a job from disk.
Every member of ``view`` calls :func:`assemble` with what it holds (live state,
snapshots, replicas a peer sent, checkpoints on its disk) and the units it needs
(the layers of its stage in the new plan). Then:

1. one all-gather tells everyone what everyone holds and needs;
2. every member computes the same answer: the latest step at which the members
   together hold every unit. A member that holds a unit it needs at that step uses
   its own copy; otherwise the first member in ring order that holds it sends it;
3. the sends go point to point, one safetensors blob per (source, destination) pair,
   so no member receives more than it needs.

No step can be put together from copies of different steps: the state of every unit is
taken at the same step, so the job goes on from a state a fault-free run also had.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from p2ptrain._errors import JobError
from p2ptrain.ring import Collectives, Node, View, send_or_fail
from p2ptrain.train._state import Units, pack_units_tensor, unpack_units_tensor
from p2ptrain.train._store import Checkpoints, StateStore

__all__ = ["Assembled", "assemble", "resume_from_disk"]

logger = logging.getLogger(__name__)

_KIND = "train.state"
_HAVE, _WANT = 0, 1


@dataclass(frozen=True)
class Assembled:
    """The outcome of :func:`assemble` on this member.

    Attributes:
        step: the step every member goes on from.
        units: this member's units at that step.
        received_bytes: bytes this member received from others.
        sources: ``unit -> member`` for the units that came from another member.
    """

    step: int
    units: Units
    received_bytes: int
    sources: dict[int, str]


def _holdings(store: StateStore | None, disk: dict[int, dict[int, Path]]) -> dict[int, set[int]]:
    held = store.holdings() if store is not None else {}
    for step, units in disk.items():
        held.setdefault(step, set()).update(units)
    return held


def _spans(units: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` as ``'0-2, 5'``."""
    out: list[str] = []
    for u in sorted(units):
        if out and out[-1].rpartition("-")[2] == str(u - 1):
            out[-1] = f"{out[-1].partition('-')[0]}-{u}"
        else:
            out.append(str(u))
    return ", ".join(out)


def _partial(have: dict[str, dict[int, set[int]]], every: set[int], checkpoints: Checkpoints | None = None) -> str:
    """What the members hold of the latest step any of them holds, what nobody holds of it, and who held that."""
    step = max(s for h in have.values() for s in h)
    held = {m: h[step] for m, h in have.items() if step in h}
    lacking = every - set().union(*held.values())
    who = "; ".join(f"{m}: {_spans(u)}" for m, u in sorted(held.items()))
    return (f"the latest, step {step}, lacks layers {_spans(lacking)} (its layers on the ring's members: {who})"
            + _held_then(checkpoints, step, lacking))


def _held_then(checkpoints: Checkpoints | None, step: int, lacking: set[int]) -> str:
    """Which members held ``lacking`` layers at ``step``, and at which address, from this member's own
    manifests of that step ("" when they do not say)."""
    holders: object = None
    if checkpoints is not None:
        for path in sorted((checkpoints.dir / f"step-{step:08d}").glob("*.json")):
            try:
                holders = json.loads(path.read_text()).get("holders")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(holders, dict):
                break
    said = []
    for m, h in sorted(holders.items()) if isinstance(holders, dict) else ():
        span = h.get("layers") if isinstance(h, dict) else None
        if (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
                and lacking & set(range(span[0], span[1] + 1))):
            said.append(f"{m} at {str(h.get('address') or 'an address not recorded')[:100]} (layers {span[0]}-{span[1]})")
    return f"; at step {step} they were on {', '.join(said)}" if said else ""


async def assemble(node: Node, view: View, *, job: str, name: str, want: Iterable[int], n_units: int,
                   store: StateStore | None = None, checkpoints: Checkpoints | None = None,
                   refuse_partial: bool = False) -> Assembled | None:
    """Agree a step with ``view``'s members and fetch this member's ``want`` units at it.

    Args:
        refuse_partial: when the members hold units of some steps but no step whole,
            raise instead of returning None (a resume must not quietly start over while
            part of the state sits on a member that is not in the ring).

    Returns:
        None when no step has every unit held somewhere (nothing to resume from).

    Raises:
        PeerFailedError: the view changed meanwhile.
        JobError: a copy that was offered turned out corrupt; with ``refuse_partial``,
            units are held but no step whole (the message names the latest step, what
            the members hold of it and what nobody does).
    """
    loop = asyncio.get_running_loop()
    disk = await loop.run_in_executor(None, checkpoints.scan) if checkpoints is not None else {}
    mine = _holdings(store, disk)
    wanted = sorted(set(want))
    rows = [[_HAVE, s, u] for s, units in mine.items() for u in units] + [[_WANT, -1, u] for u in wanted]
    coll = Collectives(node, view=view, name=f"{job}/{name}")
    gathered = await coll.all_gather(torch.tensor(rows or [[-1, -1, -1]], dtype=torch.int64).reshape(-1, 3))
    have: dict[str, dict[int, set[int]]] = {}
    needs: dict[str, list[int]] = {}
    for member, t in zip(view.members, gathered):
        for kind, s, u in t.tolist():
            if kind == _HAVE:
                have.setdefault(member, {}).setdefault(s, set()).add(u)
            elif kind == _WANT:
                needs.setdefault(member, []).append(u)
    every = set(range(n_units))
    complete = [s for s in {s for h in have.values() for s in h}
                if every <= set().union(*(h.get(s, set()) for h in have.values()))]
    if not complete:
        if refuse_partial and have:
            raise JobError(f"cannot resume: the members of this ring hold checkpoints of the job but no step with every "
                           f"layer: {_partial(have, every, checkpoints)}. Start the members that wrote the missing layers, each with "
                           "its --checkpoint-dir, or run the job without resume to train from step 0")
        return None
    step = max(complete)
    me = node.node_id
    transfers: dict[tuple[str, str], list[int]] = {}
    for member in view.members:
        for u in needs.get(member, []):
            if u in have.get(member, {}).get(step, set()):
                continue
            src = next(m for m in view.members if u in have.get(m, {}).get(step, set()))
            transfers.setdefault((src, member), []).append(u)

    def fetch(units: list[int]) -> Units:  # a thread: may read files
        out: Units = {}
        in_memory = store.holdings().get(step, set()) if store is not None else set()
        for u in units:
            if u in in_memory:
                assert store is not None
                out.update(store.get(step, [u]))
            else:
                assert checkpoints is not None, f"unit {u} at step {step} was offered but is not held"
                out.update(checkpoints.load(disk[step][u], [u]))
        return out

    async def send(dest: str, units: list[int]) -> None:
        tensor = await loop.run_in_executor(None, lambda: pack_units_tensor(fetch(units), step))
        await send_or_fail(node, dest, _KIND, epoch=view.epoch, tag=[job, name, step, me, dest], tensors=[tensor])

    received: dict[int, tuple[str, int]] = {}

    async def receive(src: str, units: list[int]) -> Units:
        msg = await node.take(_KIND, [job, name, step, src, me], epoch=view.epoch)
        wire = msg.tensors[0] if msg.tensors else None
        got_step, got = await loop.run_in_executor(None, unpack_units_tensor, wire, f"state from {src}")
        if got_step != step or any(u not in got for u in units):
            raise JobError(f"{src} sent units {sorted(got)} at step {got_step}, not {units} at step {step}")
        for u in units:
            received[u] = (src, wire.numel() if wire is not None else 0)
        return {u: got[u] for u in units}

    sends = [send(dest, units) for (src, dest), units in transfers.items() if src == me]
    receives = [receive(src, units) for (src, dest), units in transfers.items() if dest == me]
    local = [u for u in wanted if u in mine.get(step, set())]
    results = await asyncio.gather(loop.run_in_executor(None, fetch, local), *receives, *sends)
    units: Units = {}
    for part in results:
        if part:
            units.update(part)
    moved = sum({src: n for src, n in received.values()}.values())  # one blob per source
    logger.info("job %s: state at step %d assembled (%d units here, %d from peers)", job or "-", step, len(units),
                len(received))
    return Assembled(step, units, moved, {u: src for u, (src, _) in received.items()})


async def resume_from_disk(node: Node, view: View, *, job: str, want: Iterable[int], n_units: int,
                           checkpoints: Checkpoints | None) -> Assembled | None:
    """:func:`assemble` from the members' checkpoints only, for a job that resumes.

    Returns:
        None when no member holds a checkpoint of the job (it starts at step 0; logged).

    Raises:
        JobError: checkpoints exist but every usable step was refused (corrupt,
            truncated, of another job; the message names the files), or the members
            hold layers of the job's checkpoints but no step whole (a member that
            holds the rest is not in the ring).
        PeerFailedError: the view changed meanwhile.
    """
    try:
        got = await assemble(node, view, job=job, name="resume", want=want, n_units=n_units, checkpoints=checkpoints,
                             refuse_partial=True)
    except JobError as exc:
        refused = checkpoints.refused if checkpoints is not None else []
        if refused:  # the files this member set aside may be what is missing
            raise JobError(f"{exc}; refused here: {'; '.join(refused)}") from exc
        raise
    if got is None:
        refused = checkpoints.refused if checkpoints is not None else []
        if refused:
            raise JobError("cannot resume: " + "; ".join(refused))
        logger.warning("job %s: no checkpoint to resume from; starting at step 0", job or "-")
    else:
        logger.info("job %s resumes at step %d", job or "-", got.step)
    return got
