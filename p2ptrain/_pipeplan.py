"""Agreeing on a pipeline plan without a leader: profile, exchange, plan deterministically.

1. Every member profiles the job's layers on its own device with one micro-batch
   (:func:`p2ptrain._profile.profile_layers`) and times the whole model over
   ``SPEED_PROBE_S`` (its speed, throttling included) — on its compute thread.
2. The members all-gather one small tensor each: per-layer forward/backward seconds,
   parameter and activation bytes, and the member's memory. All members then hold the
   same numbers, bit for bit.
3. Each member runs the planner on those numbers; the planner is deterministic, so
   all members compute the same plan.

A device's speed is the first member's probe time over its own (``speed = t0 / ti``),
and layer costs are the first member's, so the planner works in one unit. Links: this release assumes
``DEFAULT_LINK_BYTES_PER_S`` for every link rather than measuring it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from p2ptrain._collectives import Collectives
from p2ptrain._node import Node
from p2ptrain._planner import Device, Plan, plan_pipeline
from p2ptrain._profile import LayerCost, profile_layers
from p2ptrain._zoo import Workload

__all__ = ["agree_on_plan", "DEFAULT_LINK_BYTES_PER_S"]

# 1 Gbit/s ethernet, the common case for devices on one LAN; not measured yet.
DEFAULT_LINK_BYTES_PER_S = 125e6


# Seconds of whole-model forward+backward per speed probe. CPU caps (cgroup CFS quotas,
# 10-100 ms periods) only show over many periods: per-layer medians of millisecond ops
# can fit inside one quota slice and make a 0.25-core device look faster than a full
# core (seen on the hetero4 testbed). The probe runs long enough to be throttled.
SPEED_PROBE_S = 0.6


def _speed_probe(layers: list[Any], x: Any) -> float:
    """Seconds per whole-model forward+backward, averaged over ``SPEED_PROBE_S``."""
    params = [p for m in layers for p in m.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    n, t0 = 0, time.perf_counter()
    while True:
        h = x
        for m in layers:
            h = m(h)
        h.float().sum().backward()
        n += 1
        if time.perf_counter() - t0 >= SPEED_PROBE_S and n >= 2:
            break
    for p, g in zip(params, grads):  # leave the gradients as they were
        p.grad = g
    return (time.perf_counter() - t0) / n


def _micro_input(w: Workload, micro_batch: int) -> Any:
    x, _ = w.split(w.batch(list(range(micro_batch))))
    return x


async def agree_on_plan(node: Node, w: Workload, *, global_batch: int, micro_batches: int | None, schedule: str = "1f1b", pool: Any = None) -> tuple[Plan, list[LayerCost], list[Device]]:
    """Profile here, exchange with the ring, and return the plan every member computes."""
    layers = w.layers()
    mb = global_batch // (micro_batches or len(node.view))
    loop = asyncio.get_running_loop()
    x = _micro_input(w, mb)
    costs = await loop.run_in_executor(pool, lambda: profile_layers(layers, x, repeats=3, budget_s=5.0))
    probe_s = await loop.run_in_executor(pool, _speed_probe, layers, x)
    me = next(m for m in node.members() if m.node_id == node.node_id)
    # Unknown memory (no resources announced) counts as plenty rather than none.
    mem = float(me.resources.memory_bytes if me.resources else 1 << 40)
    row = [mem, probe_s] + [v for c in costs for v in (c.fwd_s, c.bwd_s, float(c.param_bytes), float(c.act_bytes), float(c.saved_bytes))]
    rows = await Collectives(node).all_gather(torch.tensor(row, dtype=torch.float64))
    n_layers = len(layers)
    table = [r.tolist() for r in rows]
    ref = [LayerCost(*_cost(table[0], i)) for i in range(n_layers)]
    # Layer shares come from the first member's profile; each device's speed from the
    # throttling-aware whole-model probe, relative to the first member's.
    devices = []
    for member, r in zip(node.view.members, table):
        devices.append(Device(node_id=member, speed=table[0][1] / r[1] if r[1] > 0 else 1.0, memory_bytes=int(r[0]),
                              link_bytes_per_s=DEFAULT_LINK_BYTES_PER_S))
    # use_all: this release's executor puts every member of the view in the pipeline.
    plan = plan_pipeline(ref, devices, global_batch=global_batch, micro_batches=micro_batches, use_all=True, schedule=schedule)
    return plan, ref, devices


def _cost(row: list[float], i: int) -> tuple[float, float, int, int, int]:
    f, b, p, a, s = row[2 + 5 * i : 7 + 5 * i]
    return f, b, int(p), int(a), int(s)
