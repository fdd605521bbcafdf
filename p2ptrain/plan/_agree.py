"""Agreeing on a pipeline plan without a leader: measure, exchange, plan deterministically.

1. Every member profiles the job's layers on its own device with one micro-batch
   (:func:`p2ptrain.plan._profile.profile_layers`: the layers' shares of the work, their
   parameter and activation bytes) — all at once, since only the layers' shares of
   one member's work are used.
2. Then the members take interleaved turns to time the whole model (a window of its layers
   when a whole pass would take seconds: :func:`~p2ptrain.plan._window.probe_window`), an optimizer update,
   a gradient sum and a message hop while computing, each while the others on its host
   wait, unless their CPU quotas leave the host room (members of other hosts probe at
   the same time; :mod:`p2ptrain.plan._probe`): a device's speed is its own capacity
   (its fastest repeat, in quota seconds when it is capped), with the spread of its
   repeats (``Device.speed_cv``) and their median over the fastest (``typical``). These local figures depend only on the
   model's structure, the micro-batch, the device and torch, so with a
   :class:`~p2ptrain.plan.ProfileCache` a member that has seen the model takes them from
   its cache in milliseconds, and when every member does, the turns cost one ring round
   (:mod:`p2ptrain.plan._cache`).
3. When some members share a host, every member then computes at once for a moment:
   the share of its own speed each keeps is how much the members slow each other, which
   devices sharing a host do (``CostModel.shared_speed``). Devices on their own hardware
   do not, so a ring of separate devices skips this; so does a ring whose members all
   kept a share in the same host setting before (their caches remember it).
4. After a barrier (so nobody is still busy probing), every member times a
   ``LINK_PROBE_BYTES`` message and a few empty round trips to its ring successor (all
   links at once, as in training): the rate its link really carries, encryption
   included, and what one message hop costs it (its own per-op overhead in the plan).
5. The members all-gather one small tensor each with these numbers, so all of them
   hold the same figures, bit for bit, and each runs the deterministic planner on them:
   all compute the same plan.

Everything runs on the job's view: if the ring changes meanwhile, the members raise
:class:`PeerFailedError` instead of waiting for someone who is not in the job.

Units: the planner wants per-sample layer times on a device of speed 1.0. The first
member's per-layer times are scaled so they add up to its measured per-sample time
(per-layer medians of millisecond ops fit inside one CPU-quota slice and miss
throttling; the probe does not) times the ring's typical slowdown (the median over the
members of their probes' median repeat over their fastest: speeds are capacities, a step
meets the host's noise), and each device's speed is the first member's per-sample time
over its own. The update and sum figures per byte are every member's own at speed 1.0,
the least of them (:func:`at_speed_one`). A device's link rate is the slower of what it
sent to its successor and what its predecessor sent to it; each device's per-op overhead
is its own hop (``Device.hop_s``), and ``op_overhead_s`` the slowest member's (for devices met later).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import statistics
import time
from collections.abc import Collection
from typing import Any, NamedTuple

import torch

from p2ptrain._errors import PeerFailedError
from p2ptrain.plan._cache import CacheEntry, LocalProfile, ProfileCache, profile_key, reprofile_requested
from p2ptrain.plan._cost import closing_hops
from p2ptrain.plan._energy import plan_for_objective
from p2ptrain.plan._probe import SPEED_PROBE_S, SpeedProbe, micro_input, probe_in_turns
from p2ptrain.plan._profile import LayerCost, profile_layers
from p2ptrain.plan._together import probe_together
from p2ptrain.plan._types import Device, DevicePower, Plan
from p2ptrain.plan._window import probe_window
from p2ptrain.ring import Collectives, Node, View, send_or_fail
from p2ptrain.zoo import Workload

__all__ = ["LINK_PROBE_BYTES", "SPEED_PROBE_S", "Agreement", "CostModel", "agree_on_plan", "measure_link"]

log = logging.getLogger(__name__)


class CostModel(NamedTuple):
    """The measured constants of the planner's cost model (keyword arguments of its planners).

    Attributes:
        op_overhead_s: one message hop (the slowest member's half round trip).
        update_s_per_byte: optimizer update seconds per parameter byte, speed 1.0.
        reduce_s_per_byte: seconds to add one gradient byte into another, speed 1.0
            (the sums of a group's all-reduce).
        shared_speed: the members' summed speed while all of them compute, when that is
            measurably less than the sum of their own (devices sharing a host); 0: none.
        closing_hops: message hops of each step's loss sum on a training member
            (:func:`~p2ptrain.plan._cost.closing_hops` of the ring; plans on one or two
            members pay fewer).

    The executor's closing loss sum runs beside the next step's compute, on the same
    CPU: ``closing_hops`` charges its message hops to every training member (see
    :mod:`p2ptrain.plan._cost`).
    """

    op_overhead_s: float
    update_s_per_byte: float
    reduce_s_per_byte: float = 0.0
    shared_speed: float = 0.0
    closing_hops: float = 0.0



class Agreement(NamedTuple):
    """What :func:`agree_on_plan` returns: the same on every member but ``entry``.

    Attributes:
        plan: the plan every member computed.
        costs: per-layer costs on a device of speed 1.0 (the reference member's, scaled).
        devices: every member's device figures, in view order.
        model: the cost model's constants.
        entry: the profile cache entry of this member's own figures (read from it, or
            stored in it by this agreement; None: no cache): the job's measured compute
            checks them against it.
    """

    plan: Plan
    costs: list[LayerCost]
    devices: list[Device]
    model: CostModel
    entry: CacheEntry | None = None

# Bytes per link probe: 4 MiB is ~34 ms at 1 Gbit/s (long next to a round trip and a
# tbf burst, short next to planning) and ~0.3 s at 100 Mbit/s.
LINK_PROBE_BYTES = 4 << 20
_LINK_ROUNDS = 3  # best of three: the first pays for connection warm-up
_PINGS = 5

_PROBE, _PROBE_ACK = "pp.probe", "pp.probe.ack"

async def measure_link(node: Node, view: View, nbytes: int = LINK_PROBE_BYTES, *,
                       job: str = "") -> tuple[float, float, float]:
    """(bytes per second, seconds per small message, CPU seconds per byte) from this member to its ring successor.

    A collective: all members call it. Every member sends ``nbytes`` to its successor
    and times it until the successor's acknowledgement arrives (the best of
    ``_LINK_ROUNDS`` rounds counts), then times ``_PINGS`` empty round trips: half the
    median is what one message hop costs, wire and both ends' Python included. The
    process's CPU time over each round (every thread: ZeroMQ's I/O threads too), over
    the bytes it sent and received in it, is what moving a byte costs this member's
    CPU (the median round).
    """
    me = node.node_id
    succ, pred = view.successor(me), view.predecessor(me)
    payload = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    best = math.inf
    rtts: list[float] = []
    cpu: list[float] = []
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
            c0, t0 = time.process_time(), time.perf_counter()
            await send_or_fail(node, succ, _PROBE, epoch=view.epoch, tag=tag, tensors=tensors)
            await node.take(_PROBE_ACK, tag, epoch=view.epoch)
            dt = time.perf_counter() - t0
            await echoing
        finally:
            echoing.cancel()
        if tensors:
            best = min(best, dt)
            cpu.append((time.process_time() - c0) / (2 * payload.numel() * 4))  # sent and received
        else:
            rtts.append(dt)
    return payload.numel() * 4 / best, statistics.median(rtts) / 2, statistics.median(cpu)


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
    max_j_per_sample: float = 0.0,
    replica_every: int = 0,
    busy_per_cpu_s: float = 0.0,
) -> Agreement:
    """Measure here, exchange with ``view``'s members, and return the plan every member computes.

    Args:
        cache: where this member keeps its local figures between jobs; with an entry
            for this model, micro-batch and device the layer profile, speed fit and
            update probe are skipped (links are always measured). None: always measure.
        reprofile: measure even with a cached entry, and refresh it (also set by
            ``P2PTRAIN_REPROFILE=1``).
        timings: filled with the seconds of each phase (``local_s``: the layer profile,
            ``barrier_s``, ``probe_s``: the speed probes' turns, ``link_s``,
            ``gather_s``, ``plan_s``), ``cached`` (1.0 when the local
            figures came from the cache) and ``probed`` (the share of the model's
            work the speed probes ran: 1.0 for the whole model, less for a window).
        exclude: members that take part in the measurements but that the plan must
            leave out (a submitter that only offers the job).
        device: where this member will compute (a GPU member profiles its layers
            there, so the plan rests on the speed it will train at; its memory is the
            smaller of the host's and the accelerator's).
        power: what this member draws (its energy meter's power profile); every
            member's figures travel with its measurements, so plans are priced in
            joules (see :mod:`p2ptrain.plan._energy`). None: unknown.
        objective, max_slowdown, max_j_per_sample: what the plan optimises and its
            budgets (a job's fields of the same names; :func:`~p2ptrain.plan.plan_for_objective`).
        replica_every: the job's snapshot period: the snapshots' radio bytes are priced
            in joules (0: none).
        busy_per_cpu_s: the seconds of ``power.busy_w`` one CPU second of this process
            stands for (its meter's: ``1 / cores`` on a device, ``1 / share`` on an
            emulated one): with the link probe's CPU seconds per byte it gives the
            device's ``msg_busy_s_per_byte`` (0: unknown, messaging CPU not priced).

    Raises:
        PeerFailedError: the ring moved on from ``view`` (a member left or joined).
    """
    t0 = time.perf_counter()
    layers = w.layers()
    mb = max(1, global_batch // (micro_batches or len(view)))
    loop = asyncio.get_running_loop()
    device = torch.device(device)
    x = micro_input(w, mb).to(device)
    key = profile_key(layers, x, optimizer=_optimizer_name(w)) if cache is not None else ""
    # File reads and writes go off the loop too: a host's control loop shares it.
    local = None if cache is None or reprofile or reprofile_requested() else await loop.run_in_executor(
        pool, cache.get, key)
    cached = local is not None and len(local.costs) == len(layers)
    # A copy of every layer on an accelerator: model-sized work, so off the loop as well.
    on = layers if device.type == "cpu" else await loop.run_in_executor(
        pool, lambda: [copy.deepcopy(m).to(device) for m in layers])
    layer_costs = None if cached else await loop.run_in_executor(pool, _profile_local, on, x)
    t1 = time.perf_counter()
    coll = Collectives(node, view=view, name=job)
    # The speed probes take turns (module docstring, step 2), and links are timed only
    # once every member is done with them (a peer busy probing answers late and would
    # look like a slow link). With warm caches nobody probes and the turns cost one ring
    # round (~ms); when only some members are warm, they wait for the cold ones.
    t_turns = time.perf_counter()
    # A model whose whole pass would take seconds here is probed on a window of its layers.
    known = layer_costs if layer_costs is not None else (local.costs if local is not None else ())
    window = probe_window(known, mb)
    probe = None if layer_costs is None else SpeedProbe(w, layers, on, mb, device, window, profiled=True)
    speed = await probe_in_turns(node, view, coll, probe, job=job, pool=pool)
    t_speed = time.perf_counter()
    if speed is not None:
        assert layer_costs is not None
        local = LocalProfile(tuple(layer_costs), speed.per_sample_s, speed.fixed_s, speed.update_s, speed.cv,
                             speed.reduce_s, speed.busy_hop_s, speed.typical)
    assert local is not None
    costs, per_sample_s, fixed_s, update_s = list(local.costs), local.per_sample_s, local.fixed_s, local.update_s
    # The together run is one averaged pass, as a typical repeat is: set it beside this
    # member's typical pass, not its fastest, or the host's noise would read as sharing.
    # At the plan's micro-batch, where the fit is exact (fixed + mb * per_sample is the fastest
    # pass even when the fit found no slope and set the fixed part to 0).
    part_per_sample, part_fixed = window.part(per_sample_s, fixed_s)
    solo = (part_fixed + mb * part_per_sample) * local.typical
    remembered = dict(local.together)
    kept = (await probe_together(coll, on, x, solo, pool=pool, warm=probe is None, window=window, remembered=remembered)
            if len(view) > 1 else 1.0)
    # Cached figures the jobs on them measured off: plan on what those jobs measured.
    correction = local.correction(len(layers)) if speed is None else 1.0
    if correction != 1.0:
        log.info("%s plans on its cached figures times %.2f: the compute its jobs on them measured",
                 node.node_id, correction)
    entry = None
    if cache is not None:
        store = local.remembering(remembered) if speed is not None or remembered != dict(local.together) else None

        def keep(c: ProfileCache) -> float:  # store what is new; the stamp of the figures this job plans on
            if store is not None:
                c.put(key, store, refresh=speed is not None)
            return c.stamp(key)

        entry = CacheEntry(cache, key, node.node_id, await loop.run_in_executor(pool, keep, cache), local.checks,
                           local.checked_on, local.off, correction)
    t2 = time.perf_counter()
    link, hop_s, cpu_per_byte = await measure_link(node, view, job=job) if len(view) > 1 else (math.inf, 0.0, 0.0)
    t3 = time.perf_counter()
    me = next(m for m in node.members() if m.node_id == node.node_id)
    # Unknown memory (no resources announced) counts as plenty rather than none.
    mem = float(me.resources.memory_bytes if me.resources else 1 << 40)
    if device.type == "cuda":
        mem = min(mem, float(torch.cuda.get_device_properties(device).total_memory))
    # A stage's per-op cost is its hop while it computes (measured in its turn, cached
    # with its figures); the idle hop where that is unknown.
    row = [mem, per_sample_s * correction, link, max(hop_s, local.busy_hop_s), update_s, fixed_s * correction,
           local.speed_cv, local.reduce_s,
           kept, hop_s, local.typical, cpu_per_byte * busy_per_cpu_s] + [
        v for c in costs for v in (c.fwd_s, c.bwd_s, float(c.param_bytes), float(c.act_bytes), float(c.saved_bytes))]
    row += _power_row(power)
    rows = await coll.all_gather(torch.tensor(row, dtype=torch.float64))
    t4 = time.perf_counter()
    table = [r.tolist() for r in rows]
    # Speeds are capacities (each member's fastest repeats); a step meets the host's noise
    # as the probes' median repeats did: the layer costs and each device's fixed pass cost
    # are priced at the ring's median slowdown (the update, sum and hop figures are not
    # fastest-repeat figures and stay as measured).
    typical = statistics.median(r[10] for r in table)
    ref = reference_costs(table[0], len(layers), typical)
    n = len(table)
    devices = [
        Device(node_id=member, speed=table[0][1] / r[1], memory_bytes=int(r[0]),
               link_bytes_per_s=min(r[2], table[(k - 1) % n][2]), fixed_s=r[5] * typical, power=_power_of(r[-_POWER_FIELDS:]),
               hop_s=r[3], speed_cv=r[6], idle_hop_s=r[9], msg_busy_s_per_byte=r[11])
        for k, (member, r) in enumerate(zip(view.members, table))
    ]
    hop = max(r[3] for r in table)
    speeds = [d.speed for d in devices]
    model = CostModel(op_overhead_s=hop, update_s_per_byte=at_speed_one([r[4] for r in table], speeds),
                      reduce_s_per_byte=at_speed_one([r[7] for r in table], speeds),
                      shared_speed=_shared_speed(speeds, [r[8] for r in table]),
                      closing_hops=closing_hops(n))
    candidates = [d for d in devices if d.node_id not in exclude]  # every member measured; these may train
    plan = plan_for_objective(ref, candidates, objective=objective, max_slowdown=max_slowdown,
                              max_j_per_sample=max_j_per_sample, replica_every=replica_every if n > 1 else 0, global_batch=global_batch,
                              micro_batches=micro_batches, schedule=schedule, **model._asdict())
    log.debug("plan agreed: layer profile %.3f s, speed turns %.3f s, together pass %.3f s, links %.3f s, "
              "gather %.3f s, plan %.3f s", t1 - t0, t_speed - t_turns, t2 - t_speed, t3 - t2, t4 - t3, time.perf_counter() - t4)
    if timings is not None:
        timings.update(local_s=t1 - t0, barrier_s=t_turns - t1, probe_s=t2 - t_turns, link_s=t3 - t2,
                       gather_s=t4 - t3, plan_s=time.perf_counter() - t4, cached=float(cached), probed=window.work)
    return Agreement(plan, ref, devices, model, entry)


_POWER_FIELDS = 5
# Below this share of the members' summed speed kept while all compute, they share a
# host; above it the shortfall is the probes' noise (a few percent) and is not charged.
SHARED_BELOW = 0.9


def at_speed_one(figures: list[float], speeds: list[float]) -> float:
    """Per-byte seconds the members measured on their own devices, as a device of speed 1.0
    would take them: the least of each figure times its device's speed (0: none measured).

    Every member's, not the first's: which member is first is an accident of node ids, and
    with a quarter-core device first the plan priced the update at 1.8 times what the
    1.0-core device's figure said of the same work (measured on hetero4: a 0.25-core
    member timed the update at 7.4 times the 1.0-core one, its quota's periods and its
    turn-mates' memory traffic on top of its share). As for speeds, the least is the
    capacity: that noise only ever slows a figure.
    """
    scaled = [f * v for f, v in zip(figures, speeds) if f > 0]
    return min(scaled) if scaled else 0.0


def _shared_speed(speeds: list[float], kept: list[float]) -> float:
    """The ``shared_speed`` of devices of these speeds that kept these shares computing together (0: none)."""
    together = math.fsum(s * k for s, k in zip(speeds, kept))
    return together if together < SHARED_BELOW * math.fsum(speeds) else 0.0


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


def _profile_local(on: list[Any], x: Any) -> list[LayerCost]:
    """This member's layer costs (on the compute thread; ``on``: the layers on the member's device)."""
    return profile_layers(on, x, repeats=3, budget_s=5.0)


def _optimizer_name(w: Workload) -> str:
    f = w.make_optimizer
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}"


_HEAD = 12  # a row's figures before its layer costs: memory .. idle hop, typical, messaging busy


def reference_costs(row: list[float], n_layers: int, typical: float = 1.0) -> list[LayerCost]:
    """The first member's layer costs, scaled so they add up to its measured per-sample time times ``typical``."""
    raw = [row[_HEAD + 5 * i : _HEAD + 5 + 5 * i] for i in range(n_layers)]
    total = sum(f + b for f, b, *_ in raw)
    scale = row[1] * typical / total if total > 0 else 1.0
    return [LayerCost(f * scale, b * scale, int(p), int(a), int(s)) for f, b, p, a, s in raw]
