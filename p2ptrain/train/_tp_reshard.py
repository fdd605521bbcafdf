"""Tensor parallelism when members leave in order: the whole state gathered, the group re-split over the others.

A tensor-parallel member holds the only copy of its share of the weights, so it cannot
simply go. An orderly leave (``JobService.leave``, Ctrl-C of ``p2ptrain join``) is
announced in the sum every step already runs (the loss), so every member learns it at
the same step boundary. There:

1. every member all-gathers every split weight and its optimizer moments (Adam's
   ``exp_avg`` / ``exp_avg_sq``) and puts the original layers back: the whole model and
   optimizer state, on every member (:func:`gather_whole`);
2. the leavers stop: their run ends with the model trained so far;
3. the others wait until the leavers are out of the ring (at most ``recover_timeout``),
   cut the model again over themselves with their shares, give every new piece its slice
   of the optimizer moments (the replicated parameters keep theirs) and go on from the
   next step (:func:`part_ways`). No step is lost or repeated, so the run computes what
   one process computes (``tests/p2ptrain/test_tensor.py`` checks it with AdamW).

A member that cannot re-split (a device copy of its layers, or ``recover=False``) says
so in the same sum; then the whole group stops at that boundary, the model gathered.
A member that *fails* (no goodbye) takes its share with it: the job stops
(``TensorParallelTrainer._recover``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from p2ptrain._errors import JobError
from p2ptrain.ring import View
from p2ptrain.train._admit import carried_over
from p2ptrain.train._recovery import next_view
from p2ptrain.train._tp_layers import TPContext
from p2ptrain.train._tp_surgery import shard_model

if TYPE_CHECKING:
    from p2ptrain.train._tensor import TensorParallelTrainer

__all__ = ["Moments", "gather_whole", "part_ways"]

logger = logging.getLogger(__name__)

# The optimizer state of each split weight, whole: (id(module), attr) -> {key: value}.
Moments = dict[tuple[int, str], dict[str, Any]]


async def gather_whole(trainer: TensorParallelTrainer, *, with_state: bool) -> Moments:
    """All-gather every split weight (and, ``with_state``, its optimizer state) and put the original layers back.

    Every member of the trainer's view calls it at the same point.

    Raises:
        JobError: a piece that arrived does not fit.
        PeerFailedError: the view changed meanwhile.
    """
    loop = asyncio.get_running_loop()
    moments: Moments = {}
    for shard in trainer.surgery.shards:
        pieces = await trainer.coll.all_gather(shard.local.detach())
        state = trainer.opt.state.get(shard.local, {}) if with_state and trainer.opt is not None else {}
        whole: dict[str, Any] = {}
        for key in sorted(state):  # the same keys on every member: all took the same steps
            value = state[key]
            if isinstance(value, torch.Tensor) and value.shape == shard.local.shape:
                whole[key] = shard.assemble(await trainer.coll.all_gather(value.detach()))
            else:
                whole[key] = value  # Adam's step count: the same on every member
        moments[(id(shard.module), shard.attr)] = whole
        await loop.run_in_executor(None, trainer.surgery.install, shard, pieces)
    trainer.surgery.reattach()
    trainer.whole = True
    return moments


async def part_ways(trainer: TensorParallelTrainer, leaving: list[str], go_on: bool) -> None:
    """Members ``leaving`` leave at this step boundary; the others go on re-split over themselves if ``go_on``.

    Raises:
        JobError: a member that stays left the ring meanwhile.
        PeerFailedError: no view without the leavers came within ``recover_timeout``.
    """
    moments = await gather_whole(trainer, with_state=go_on)
    me = trainer.node.node_id
    if me in leaving or not go_on:
        trainer.leaving = True  # the run ends at this boundary, the model whole
        return
    stay = [m for m in trainer.view.members if m not in leaving]
    deadline = time.monotonic() + trainer.recover_timeout
    view = trainer.node.view
    # The leavers go once their run has ended (one that keeps its node steps out and back in as a newcomer).
    while any(m in carried_over(trainer.node, trainer.view, view) for m in leaving):
        view = await next_view(trainer.node, view, max(0.0, deadline - time.monotonic()))
    missing = [m for m in stay if m not in view]
    if missing:
        raise JobError(f"{', '.join(missing)} left the ring while the tensor-parallel group was re-split")
    new = View(view.epoch, tuple(stay))
    await asyncio.get_running_loop().run_in_executor(trainer._pool, _resplit, trainer, new, moments)
    trainer.rebind(new)
    trainer.bind_comm()
    logger.warning("job %s: %s left at step %d; the tensor-parallel group goes on re-split over %d members",
                   trainer.job or "-", ", ".join(leaving), trainer.next_step, len(new))


def _resplit(trainer: TensorParallelTrainer, view: View, moments: Moments) -> None:
    """Cut the whole model again over ``view`` and carry the optimizer state over (compute thread)."""
    rank = view.rank(trainer.node.node_id)
    shares = [trainer.shares_of[m] for m in view.members]
    old = trainer.opt
    trainer.tp = TPContext(trainer.tp.comm, rank, shares, sequence_parallel=trainer.tp.sequence_parallel)
    trainer.surgery = shard_model(trainer.w.model, trainer.tp)
    trainer.whole = False
    trainer.bind_split()
    trainer.opt = trainer.w.make_optimizer(trainer.params, trainer.lr)
    for p in trainer.replicated:
        if old is not None and p in old.state:
            trainer.opt.state[p] = old.state[p]
    for shard in trainer.surgery.shards:
        whole = moments.get((id(shard.module), shard.attr), {})
        trainer.opt.state[shard.local] = {
            k: shard.take(v, rank) if isinstance(v, torch.Tensor) and v.shape == shard.shape
            else v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in whole.items()
        }
