"""Agreeing on a pipeline plan without a leader: measure, exchange, plan deterministically.

1. Every member profiles the job's layers on its own device with one micro-batch
   (:func:`p2ptrain.plan._profile.profile_layers`: the layers' shares of the work, their
   parameter and activation bytes), times the whole model over ``SPEED_PROBE_S`` at
   two batch sizes (its real speed, CPU throttling included, split into a per-sample
   and a fixed per-pass part) and times an optimizer update — on its compute thread.
   These local figures depend only on the model's structure, the micro-batch, the device
   and torch, so with a :class:`~p2ptrain.plan.ProfileCache` a member that has seen the
   model takes them from its cache in milliseconds (:mod:`p2ptrain.plan._cache`).
2. After a barrier (so nobody is still busy probing; with warm caches it costs one ring
   round, since nobody is), every member times a
   ``LINK_PROBE_BYTES`` message and a few empty round trips to its ring successor (all
   links at once, as in training): the rate its link really carries, encryption
   included, and what one message hop costs.
3. The members all-gather one small tensor each with these numbers, so all of them
   hold the same figures, bit for bit, and each runs the deterministic planner on them:
   all compute the same plan.

Everything runs on the job's view: if the ring changes meanwhile, the members raise
:class:`PeerFailedError` instead of waiting for someone who is not in the job.

Units: the planner wants per-sample layer times on a device of speed 1.0. The first
member's per-layer times are scaled so they add up to its measured per-sample time
(per-layer medians of millisecond ops fit inside one CPU-quota slice and miss
throttling; the probe does not), and each device's speed is the first member's
per-sample time over its own. A device's link rate is the slower of what it sent to its
successor and what its predecessor sent to it; the per-op overhead is the slowest
member's hop.
"""

from __future__ import annotations

import asyncio
import copy
import math
import statistics
import time
from collections.abc import Collection
from typing import Any, NamedTuple

import torch

from p2ptrain._device import HOST as _HOST
from p2ptrain._device import synchronize
from p2ptrain._errors import PeerFailedError
from p2ptrain.plan._cache import LocalProfile, ProfileCache, profile_key, reprofile_requested
from p2ptrain.plan._energy import plan_for_objective
from p2ptrain.plan._profile import LayerCost, profile_layers
from p2ptrain.plan._types import Device, DevicePower, Plan
from p2ptrain.ring import Collectives, Node, View, send_or_fail
from p2ptrain.zoo import Workload

__all__ = ["LINK_PROBE_BYTES", "SPEED_PROBE_S", "CostModel", "agree_on_plan", "measure_link"]


class CostModel(NamedTuple):
    """The measured constants of the planner's cost model (keyword arguments of its planners).

    Attributes:
        op_overhead_s: one message hop (the slowest member's half round trip).
        update_s_per_byte: optimizer update seconds per parameter byte, speed 1.0.

    The executor's closing loss sum runs off the next step's critical path, so no
    step tail is charged for it.
    """

    op_overhead_s: float
    update_s_per_byte: float

# Seconds of whole-model forward+backward per speed probe. CPU caps (cgroup CFS quotas,
# 10-100 ms periods) only show over many periods; the probe runs long enough to be throttled.
SPEED_PROBE_S = 0.6

# Bytes per link probe: 4 MiB is ~34 ms at 1 Gbit/s (long next to a round trip and a
# tbf burst, short next to planning) and ~0.3 s at 100 Mbit/s.
LINK_PROBE_BYTES = 4 << 20
_LINK_ROUNDS = 3  # best of three: the first pays for connection warm-up
_PINGS = 5

_PROBE, _PROBE_ACK = "pp.probe", "pp.probe.ack"


def _speed_probe(layers: list[Any], x: Any) -> float:
    """Seconds per whole-model forward+backward on ``x``, averaged over ``SPEED_PROBE_S``."""
    params = [p for m in layers for p in m.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    n, t0 = 0, time.perf_counter()
    while True:
        h = x
        for m in layers:
            h = m(h)
        h.float().sum().backward()
        n += 1
        synchronize(x.device)  # an accelerator's kernels finish before the clock is read
        if time.perf_counter() - t0 >= SPEED_PROBE_S and n >= 2:
            break
    for p, g in zip(params, grads):  # leave the gradients as they were
        p.grad = g
    return (time.perf_counter() - t0) / n


async def measure_link(node: Node, view: View, nbytes: int = LINK_PROBE_BYTES, *, job: str = "") -> tuple[float, float]:
    """(bytes per second, seconds per small message) from this member to its ring successor.

    A collective: all members call it. Every member sends ``nbytes`` to its successor
    and times it until the successor's acknowledgement arrives (the best of
    ``_LINK_ROUNDS`` rounds counts), then times ``_PINGS`` empty round trips: half the
    median is what one message hop costs, wire and both ends' Python included.
    """
    me = node.node_id
    succ, pred = view.successor(me), view.predecessor(me)
    payload = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    best = math.inf
    rtts = []
    for r in range(_LINK_ROUNDS + _PINGS):
        if node.view.epoch != view.epoch:
            raise PeerFailedError(f"the ring moved from view {view.epoch} to {node.view.epoch} while measuring links")
        tag = [view.digest, job, r]
        tensors = [payload] if r < _LINK_ROUNDS else []

        # The round's tag goes in as an argument: a closure would read the loop variable.
        async def echo(tag: list[Any]) -> None:
            await node.take(_PROBE, tag, epoch=view.epoch)
            await send_or_fail(node, pred, _PROBE_ACK, epoch=view.epoch, tag=tag)

        echoing = asyncio.ensure_future(echo(tag))
        try:
            t0 = time.perf_counter()
            await send_or_fail(node, succ, _PROBE, epoch=view.epoch, tag=tag, tensors=tensors)
            await node.take(_PROBE_ACK, tag, epoch=view.epoch)
            dt = time.perf_counter() - t0
            await echoing
        finally:
            echoing.cancel()
        if tensors:
            best = min(best, dt)
        else:
            rtts.append(dt)
    return payload.numel() * 4 / best, statistics.median(rtts) / 2


def _update_probe(w: Workload, layers: list[Any]) -> float:
    """Seconds per parameter byte of one optimizer update (on copies: the model is untouched)."""
    copies = [p.detach().clone().requires_grad_(True) for m in layers for p in m.parameters()]
    if not copies:
        return 0.0
    for c in copies:
        c.grad = torch.full_like(c, 1e-3)
    opt = w.make_optimizer(copies, 1e-3)
    opt.step()  # the first update allocates the state
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < 0.1:
        opt.step()
        n += 1
    nbytes: int = sum(c.numel() * c.element_size() for c in copies)  # the copies are typed Any
    return (time.perf_counter() - t0) / n / nbytes


def _speed_fit(w: Workload, layers: list[Any], mb: int, device: torch.device = _HOST) -> tuple[float, float]:
    """(seconds per sample, fixed seconds per pass) of whole-model forward+backward here.

    Probes ``mb`` samples and a quarter of that, and fits ``t(n) = fixed + n * per_sample``:
    a group member runs only its share of each micro-batch, and on a slow CPU the
    fixed per-pass cost (interpreter, op dispatch) is a large part of a small share.
    """
    t_big = _speed_probe(layers, _micro_input(w, mb).to(device))
    small = max(1, mb // 4)
    if small == mb:
        return t_big / mb, 0.0
    t_small = _speed_probe(layers, _micro_input(w, small).to(device))
    per_sample = (t_big - t_small) / (mb - small)
    if per_sample <= 0:  # noise swamped the difference: no fixed part
        return t_big / mb, 0.0
    return per_sample, max(0.0, t_big - per_sample * mb)


def _micro_input(w: Workload, micro_batch: int) -> Any:
    x, _ = w.split(w.batch(list(range(micro_batch))))
    return x


async def agree_on_plan(
    node: Node,
    view: View,
    w: Workload,
    *,
    global_batch: int,
    micro_batches: int | None,
    schedule: str = "1f1b",
    pool: Any = None,
    job: str = "",
    cache: ProfileCache | None = None,
    reprofile: bool = False,
    timings: dict[str, float] | None = None,
    exclude: Collection[str] = (),
    device: torch.device | str = "cpu",
    power: DevicePower | None = None,
    objective: str = "time",
    max_slowdown: float = 0.0,
) -> tuple[Plan, list[LayerCost], list[Device], CostModel]:
    """Measure here, exchange with ``view``'s members, and return the plan every member computes.

    Args:
        cache: where this member keeps its local figures between jobs; with an entry
            for this model, micro-batch and device the layer profile, speed fit and
            update probe are skipped (links are always measured). None: always measure.
        reprofile: measure even with a cached entry, and refresh it (also set by
            ``P2PTRAIN_REPROFILE=1``).
        timings: filled with the seconds of each phase (``local_s``, ``barrier_s``,
            ``link_s``, ``gather_s``, ``plan_s``) and ``cached`` (1.0 when the local
            figures came from the cache).
        exclude: members that take part in the measurements but that the plan must
            leave out (a submitter that only offers the job).
        device: where this member will compute (a GPU member profiles its layers
            there, so the plan rests on the speed it will train at; its memory is the
            smaller of the host's and the accelerator's).
        power: what this member draws (its energy meter's power profile); every
            member's figures travel with its measurements, so plans are priced in
            joules (see :mod:`p2ptrain.plan._energy`). None: unknown.
        objective, max_slowdown: what the plan optimises (a job's fields of the same
            names; :func:`~p2ptrain.plan.plan_for_objective`).

    Raises:
        PeerFailedError: the ring moved on from ``view`` (a member left or joined).
    """
    t0 = time.perf_counter()
    layers = w.layers()
    mb = max(1, global_batch // (micro_batches or len(view)))
    loop = asyncio.get_running_loop()
    device = torch.device(device)
    x = _micro_input(w, mb).to(device)
    key = profile_key(layers, x, optimizer=_optimizer_name(w)) if cache is not None else ""
    # File reads and writes go off the loop too: a host's control loop shares it.
    local = None if cache is None or reprofile or reprofile_requested() else await loop.run_in_executor(
        pool, cache.get, key)
    cached = local is not None and len(local.costs) == len(layers)
    if not cached:
        local = await loop.run_in_executor(pool, _measure_local, w, layers, x, mb, device)
        if cache is not None:
            await loop.run_in_executor(pool, cache.put, key, local)
    assert local is not None
    costs, per_sample_s, fixed_s, update_s = list(local.costs), local.per_sample_s, local.fixed_s, local.update_s
    t1 = time.perf_counter()
    coll = Collectives(node, view=view, name=job)
    # Links are timed only once every member is done with the CPU-heavy probes above (a
    # peer busy importing and profiling answers late and would look like a slow link).
    # With warm caches nobody is busy and the barrier costs one ring round (~ms); when
    # only some members are warm, they wait here for the cold ones, as they must.
    await coll.barrier()
    t2 = time.perf_counter()
    link, hop_s = await measure_link(node, view, job=job) if len(view) > 1 else (math.inf, 0.0)
    t3 = time.perf_counter()
    me = next(m for m in node.members() if m.node_id == node.node_id)
    # Unknown memory (no resources announced) counts as plenty rather than none.
    mem = float(me.resources.memory_bytes if me.resources else 1 << 40)
    if device.type == "cuda":
        mem = min(mem, float(torch.cuda.get_device_properties(device).total_memory))
    row = [mem, per_sample_s, link, hop_s, update_s, fixed_s] + [
        v for c in costs for v in (c.fwd_s, c.bwd_s, float(c.param_bytes), float(c.act_bytes), float(c.saved_bytes))]
    row += _power_row(power)
    rows = await coll.all_gather(torch.tensor(row, dtype=torch.float64))
    t4 = time.perf_counter()
    table = [r.tolist() for r in rows]
    ref = reference_costs(table[0], len(layers))
    n = len(table)
    devices = [
        Device(node_id=member, speed=table[0][1] / r[1], memory_bytes=int(r[0]),
               link_bytes_per_s=min(r[2], table[(k - 1) % n][2]), fixed_s=r[5], power=_power_of(r[-_POWER_FIELDS:]))
        for k, (member, r) in enumerate(zip(view.members, table))
    ]
    hop = max(r[3] for r in table)
    model = CostModel(op_overhead_s=hop, update_s_per_byte=table[0][4])
    candidates = [d for d in devices if d.node_id not in exclude]  # every member measured; these may train
    plan = plan_for_objective(ref, candidates, objective=objective, max_slowdown=max_slowdown, global_batch=global_batch,
                              micro_batches=micro_batches, schedule=schedule, **model._asdict())
    if timings is not None:
        timings.update(local_s=t1 - t0, barrier_s=t2 - t1, link_s=t3 - t2, gather_s=t4 - t3,
                       plan_s=time.perf_counter() - t4, cached=float(cached))
    return plan, ref, devices, model


_POWER_FIELDS = 5


def _power_row(power: DevicePower | None) -> list[float]:
    """A member's power figures as numbers for the all-gather (negative: unknown / on mains)."""
    if power is None:
        return [-1.0] * _POWER_FIELDS
    return [power.idle_w, power.busy_w, power.link_j_per_byte, power.link_j_per_frame,
            -1.0 if power.battery is None else power.battery]


def _power_of(r: list[float]) -> DevicePower | None:
    idle, busy, jpb, jpf, battery = r
    if idle < 0:
        return None
    return DevicePower(idle, busy, jpb, jpf, None if battery < 0 else battery)


def _measure_local(w: Workload, layers: list[Any], x: Any, mb: int, device: torch.device) -> LocalProfile:
    """This member's own figures: layer costs, speed fit, update probe (on the compute thread).

    Layers and speed are measured on ``device`` (copies there, for an accelerator); the
    update on the host, where a GPU member's optimizer runs (p2ptrain/_device.py).
    """
    on = layers if device.type == "cpu" else [copy.deepcopy(m).to(device) for m in layers]
    costs = profile_layers(on, x, repeats=3, budget_s=5.0)
    per_sample_s, fixed_s = _speed_fit(w, on, mb, device)
    return LocalProfile(tuple(costs), per_sample_s, fixed_s, _update_probe(w, layers))


def _optimizer_name(w: Workload) -> str:
    f = w.make_optimizer
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}"


def reference_costs(row: list[float], n_layers: int) -> list[LayerCost]:
    """The first member's layer costs, scaled so they add up to its measured per-sample time."""
    raw = [row[6 + 5 * i : 11 + 5 * i] for i in range(n_layers)]
    total = sum(f + b for f, b, *_ in raw)
    scale = row[1] / total if total > 0 else 1.0
    return [LayerCost(f * scale, b * scale, int(p), int(a), int(s)) for f, b, p, a, s in raw]
