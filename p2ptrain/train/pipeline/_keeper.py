"""Copies of a stage's state kept elsewhere, so a pipeline survives losing the stage's member.

Every ``replica_every`` steps, right after the optimizer step, each member copies the
state of its layers (parameters and optimizer state, on the compute thread: one clone)
into its own :class:`~p2ptrain.train._store.StateStore`. The first member of each stage
also sends that copy, in the background, to its *keeper*: the next member in ring order
that is not in its stage (a member the plan leaves out is a fine keeper). So every
layer's state at every snapshot step lives on two members, and losing any one member
loses no layer. Members of one data-parallel group hold the same state, so only one
of them sends.

Every ``checkpoint_every`` steps the member also writes its layers to its checkpoint
directory (:class:`~p2ptrain.train._store.Checkpoints`), on a thread. Sends and writes
are kept to one in flight each: a snapshot waits for the previous one's message or
file, never the training step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from p2ptrain._errors import JobError, PeerFailedError
from p2ptrain.ring import Node, View, send_or_fail, wait_ended
from p2ptrain.train._state import Units, pack_units_tensor, unpack_units_tensor
from p2ptrain.train._store import Checkpoints, StateStore
from p2ptrain.train.pipeline._layout import Stage

__all__ = ["HANDOVER", "REPLICA", "StageKeeper", "keeper_of"]

logger = logging.getLogger(__name__)

REPLICA = "pp.replica"
# A member that leaves in order (Ctrl-C) sends its live state to its keeper first, so
# the others go on from where it stopped instead of its last snapshot.
HANDOVER = "pp.handover"


def keeper_of(layout: Sequence[Stage], view: View) -> dict[str, str]:
    """sender -> keeper: the first member of each stage and the member that keeps its copies."""
    out: dict[str, str] = {}
    for st in layout:
        group = {m for m, _ in st.members}
        leader = st.members[0][0]
        start = view.rank(leader)
        for k in range(1, len(view)):
            other = view.members[(start + k) % len(view)]
            if other not in group:
                out[leader] = other
                break
    return out


class StageKeeper:
    """Snapshots, replicas and checkpoints of one member's stage in one view.

    Args:
        node: the member's node.
        view: the job's view.
        layout: the job's layout in that view.
        job: the job's name (goes in every tag).
        store: where this member keeps its snapshots and the replicas it receives.
        capture: returns this member's units (called on the compute thread).
        every: snapshot (and replica) period in steps; 0: none.
        checkpoints: this member's checkpoint directory, or None.
        checkpoint_every: checkpoint period in steps; 0: none.
        steps: the job's step count (receivers stop there).
        manifest: extra fields for the checkpoint manifests.
    """

    def __init__(self, node: Node, view: View, layout: Sequence[Stage], *, job: str, store: StateStore,
                 capture: Callable[[], Units], every: int, checkpoints: Checkpoints | None, checkpoint_every: int,
                 steps: int, manifest: dict[str, Any] | None = None) -> None:
        self.node, self.view, self.job, self.store = node, view, job, store
        self.capture, self.every, self.steps = capture, every, steps
        self.checkpoints, self.checkpoint_every = checkpoints, checkpoint_every
        self.manifest = manifest or {}
        keepers = keeper_of(layout, view)
        self.layers = {m: [st.first_layer, st.last_layer] for st in layout for m, _ in st.members}
        self.target = keepers.get(node.node_id)
        self.senders = sorted(m for m, k in keepers.items() if k == node.node_id)
        self._sending: asyncio.Future[None] | None = None
        self._writing: asyncio.Future[Any] | None = None
        self._receivers: list[asyncio.Task[None]] = []
        self._unpacking: list[asyncio.Future[Any]] = []  # handovers received, still being read
        self.sent = self.received = self.written = 0
        self.snapshot_s = 0.0  # compute-thread seconds spent copying state

    def due(self, next_step: int) -> tuple[bool, bool]:
        """(snapshot, checkpoint) due after the step that makes ``next_step``."""
        snap = bool(self.every) and next_step % self.every == 0
        ckpt = self.checkpoints is not None and bool(self.checkpoint_every) and next_step % self.checkpoint_every == 0
        return snap, ckpt

    def start(self, first: int) -> None:
        """Listen for the replicas sent to this member from snapshot step ``first`` on."""
        for sender in self.senders:
            if self.every:
                self._receivers.append(asyncio.ensure_future(self._receive(sender, first)))
            self._receivers.append(asyncio.ensure_future(self._receive_handover(sender)))

    async def _receive_handover(self, sender: str) -> None:
        try:
            msg = await self.node.take(HANDOVER, [self.job, self.view.digest, sender], epoch=self.view.epoch)
        except PeerFailedError:
            return
        wire = msg.tensors[0] if msg.tensors else None
        reading = asyncio.get_running_loop().run_in_executor(None, unpack_units_tensor, wire, f"handover from {sender}")

        def store(fut: asyncio.Future[tuple[int, Units]]) -> None:  # runs even if this task is cancelled
            if fut.cancelled():
                return
            exc = fut.exception()
            if isinstance(exc, JobError):
                logger.error("%s; dropped", exc)
            elif exc is not None:
                logger.error("reading the handover from %s failed; dropped", sender, exc_info=exc)
            else:
                step, units = fut.result()
                self.store.put(sender, step, units)
                logger.info("holding %s's state at step %d (it left)", sender, step)

        reading.add_done_callback(store)
        self._unpacking.append(reading)

    async def hand_over(self, next_step: int, units: Units, timeout: float) -> None:
        """Send this member's live state to its keeper before leaving; returns once it is on the wire."""
        if self.target is None:
            return
        wire = await asyncio.get_running_loop().run_in_executor(None, pack_units_tensor, units, next_step)
        await asyncio.wait_for(send_or_fail(
            self.node, self.target, HANDOVER, epoch=self.view.epoch, tag=[self.job, self.view.digest, self.node.node_id],
            tensors=[wire]), timeout)

    def _tag(self, sender: str, step: int) -> list[Any]:
        return [self.job, self.view.digest, sender, step]

    async def _receive(self, sender: str, first: int) -> None:
        loop = asyncio.get_running_loop()
        step = first
        while step <= self.steps:
            try:
                msg = await self.node.take(REPLICA, self._tag(sender, step), epoch=self.view.epoch)
            except PeerFailedError:
                return  # the view changed: recovery takes over
            wire = msg.tensors[0] if msg.tensors else None
            try:
                got_step, units = await loop.run_in_executor(None, unpack_units_tensor, wire, f"replica from {sender}")
            except JobError as exc:
                logger.error("%s; dropped", exc)
            except Exception:  # a bug of ours must not end this sender's replicas without a word
                logger.exception("reading the replica from %s at step %d failed; dropped", sender, step)
            else:
                if got_step == step:
                    self.store.put(sender, step, units)
                    self.received += 1
                else:
                    logger.error("the replica from %s tagged step %d holds step %d; dropped", sender, step, got_step)
            step = (step // self.every + 1) * self.every

    async def keep(self, next_step: int, units: Units, *, snapshot: bool, checkpoint: bool) -> None:
        """Keep ``units`` (this member's state at ``next_step``) as due: in memory, at the keeper, on disk."""
        if snapshot:
            self.store.put(self.node.node_id, next_step, units)
            if self.target is not None:
                if self._sending is not None:
                    await _settle(self._sending, "replica send")
                self._sending = asyncio.ensure_future(self._send(next_step, units))
        if checkpoint:
            assert self.checkpoints is not None
            if self._writing is not None:
                await _settle(self._writing, "checkpoint write")
            ckpt = self.checkpoints
            # Who held which layers, and where: a resume that lacks some names the devices to start again
            # (node ids alone did not say which device, and --ephemeral ones change every start).
            where = {m.node_id: m.address or "" for m in self.node.members()}
            holders = {m: {"layers": span, "address": where.get(m, "")} for m, span in self.layers.items()}
            extra = {**self.manifest, "view": list(self.view.members), "holders": holders}
            self._writing = asyncio.get_running_loop().run_in_executor(None, lambda: ckpt.write(next_step, units, extra))
            self.written += 1

    async def _send(self, step: int, units: Units) -> None:
        assert self.target is not None
        wire = await asyncio.get_running_loop().run_in_executor(None, pack_units_tensor, units, step)
        await send_or_fail(self.node, self.target, REPLICA, epoch=self.view.epoch, tag=self._tag(self.node.node_id, step),
                           tensors=[wire])
        self.sent += 1

    async def close(self, *, wait: bool) -> None:
        """Stop listening; with ``wait``, let the last send and write finish first (their errors are logged)."""
        for task in self._receivers:
            task.cancel()
        for fut, what in ((self._sending, "replica send"), (self._writing, "checkpoint write")):
            if fut is None:
                continue
            if wait or (fut.done() and not fut.cancelled()):  # a finished one's failure is still logged
                await _settle(fut, what)
            else:
                fut.cancel()
                await wait_ended(fut)
        self._sending = self._writing = None  # settled: a second close says nothing twice
        await asyncio.gather(*self._receivers, return_exceptions=True)
        self._receivers.clear()
        await asyncio.gather(*self._unpacking, return_exceptions=True)  # a handover read so far is kept
        self._unpacking.clear()


async def _settle(fut: asyncio.Future[Any], what: str) -> None:
    try:
        await fut
    except PeerFailedError:
        pass  # the view changed: recovery takes over
    except Exception as exc:
        logger.error("%s failed: %s: %s", what, type(exc).__name__, exc)
