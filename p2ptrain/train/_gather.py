"""Weights back: the trained model, whole, on the member that submitted the job.

With data parallelism every member holds the whole model, so the submitter has it.
A pipeline or hybrid job leaves each layer on the members of one stage only, so when
the run ends every member of the job's final view calls :func:`weights_back` (after
its last step, in the same place of the protocol) and

1. every member works out the same sources from the final layout: for each stage the
   submitter is not part of, the stage's first member sends that stage's layers (the
   members of a data-parallel group hold identical copies, so one sends);
2. each source sends the submitter one safetensors blob per layer
   (:func:`~p2ptrain.train._state.pack_units`: names, dtypes, shapes and raw bytes,
   no pickle), point to point, one layer at a time so a large model never needs a
   second copy of more than a layer on the sender;
3. the submitter checks each blob against its own copy of the layer (every name,
   shape and dtype, nothing applied half-way) and copies it into its model.

Members the plan left out hold nothing and send nothing (the submitter may be one of
them: it then receives every layer); members that joined mid-job are in the final
layout like any other. A blob carries the layer's whole ``state_dict`` (parameters,
frozen ones too, and persistent buffers), so the submitter's ``workload.model`` ends
as the trained model and its ``state_dict()`` is the job's result.

The submitter is named in the job id (``JobService`` builds it as
``<submitter node id>/<spec digest>/<nonce>``; node ids hold no ``/``), so every
member, newcomers included, knows where to send without another message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import torch

from p2ptrain._errors import JobError
from p2ptrain.ring import send_or_fail
from p2ptrain.train._dataparallel import TrainResult, param_digest
from p2ptrain.train._state import check_fits, pack_units_tensor, unpack_units_tensor

__all__ = ["gather_sources", "weights_back"]

logger = logging.getLogger(__name__)

_KIND = "train.weights"


def gather_sources(layout: Sequence[Any], to: str) -> dict[int, str]:
    """``layer -> member`` that sends it to ``to``: each stage's first member, unless ``to`` runs that stage.

    Pure arithmetic on the layout, so every member computes the same answer.
    """
    out: dict[int, str] = {}
    for st in layout:
        ids = [m for m, _ in st.members]
        if to in ids:
            continue
        for u in range(st.first_layer, st.last_layer + 1):
            out[u] = ids[0]
    return out


def _named(layer: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(layer.state_dict(keep_vars=False).items())


async def weights_back(trainer: Any, result: TrainResult, to: str) -> None:
    """Put the whole trained model on ``to`` (the submitter); every member of the job calls it after ``run()``.

    On ``to`` the trainer's ``workload.model`` then holds the trained weights,
    ``result.state_dict`` is its ``state_dict()`` (tensors that share storage with the
    model: clone them to keep a copy apart from further training) and ``result.digest``
    its :func:`param_digest`. Elsewhere ``result.state_dict`` stays None.

    A data-parallel trainer needs no messages. A pipeline trainer that left the job
    mid-run (its peers went on without it) does nothing; neither does anyone when
    ``to`` is not in the job's final view (it failed or left).

    Raises:
        PeerFailedError: the view changed before every layer arrived.
        JobError: a layer that arrived does not fit the model.
    """
    me = trainer.node.node_id
    layout = getattr(trainer, "layout", None)
    if layout is None:  # data parallelism: every replica holds the whole model (a tensor job's, its layers whole again)
        if me == to:
            result.state_dict = trainer.w.model.state_dict()
            result.digest = await asyncio.get_running_loop().run_in_executor(None, param_digest, trainer.w.model)
        return
    view = trainer.view
    if trainer.left_at is not None or to not in view:
        if me == to:
            logger.warning("job %s: this member left before the end; it holds no whole model", trainer.job or "-")
        return
    sources = gather_sources(layout, to)
    step = trainer.next_step
    tag = [trainer.job, "weights", step]
    loop = asyncio.get_running_loop()
    if me != to:
        for u in sorted(u for u, src in sources.items() if src == me):
            tensor = await loop.run_in_executor(None, _pack, trainer.layers[u], u, step)
            await send_or_fail(trainer.node, to, _KIND, epoch=view.epoch, tag=[*tag, u], tensors=[tensor])
        return

    async def receive(u: int, src: str) -> None:
        msg = await trainer.node.take(_KIND, [*tag, u], epoch=view.epoch)
        if msg.sender != src:
            raise JobError(f"layer {u} of the trained model came from {msg.sender}, not from {src}")
        wire = msg.tensors[0] if msg.tensors else None
        got_step, units = await loop.run_in_executor(None, unpack_units_tensor, wire, f"layer {u} from {src}")
        if got_step != step or set(units) != {u}:
            raise JobError(f"{src} sent layers {sorted(units)} at step {got_step}, not layer {u} at step {step}")
        await loop.run_in_executor(None, _install, trainer.layers[u], units[u], f"layer {u} from {src}")

    receiving = [asyncio.ensure_future(receive(u, src)) for u, src in sources.items()]
    try:
        await asyncio.gather(*receiving)
    except BaseException:
        for r in receiving:  # the other layers' waits would linger until the next view change
            r.cancel()
        await asyncio.gather(*receiving, return_exceptions=True)
        raise
    result.state_dict = trainer.w.model.state_dict()
    trainer.gathered = step  # the model is whole here, at this step (a stopped job's submitter writes it)
    # The whole model's digest, as a replica's is (it was this member's own stage: sha-256 of
    # nothing when the plan left the submitter out; a walkthrough).
    result.digest = await loop.run_in_executor(None, param_digest, trainer.w.model)
    logger.info("job %s: trained model gathered at step %d (%d layers from %d members)", trainer.job or "-", step,
                len(sources), len(set(sources.values())))


def _pack(layer: torch.nn.Module, unit: int, step: int) -> torch.Tensor:
    """Layer ``unit``'s whole state as a :func:`pack_units_tensor` blob to send, under the unit names ``p/<name>`` (a thread)."""
    return pack_units_tensor({unit: {f"p/{n}": t for n, t in _named(layer)}}, step)


def _install(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy a layer's state from :func:`_pack` into ``layer``, after checking all of it fits."""
    named = _named(layer)
    check_fits(tensors, named, what)
    with torch.no_grad():
        for name, t in named:
            t.copy_(tensors[f"p/{name}"])

