"""The together pass: how much of its own speed a member keeps while every member computes.

Step 3 of :func:`~p2ptrain.plan.agree_on_plan`. Devices that share a host (the testbed's
namespaces, processes of one machine) do not keep all of their speed once the host is
full: on the 2-core testbed host the four hetero4 devices' caps add up to every core, and
anything else running takes its part (the planner's ``shared_speed``). Devices on their
own hardware keep all of it, so a ring of separate devices skips the pass.

A member's share depends on its *host setting* (:func:`host_setting`): the host's cores,
the CPU demands of the members on it, its own and the layers it runs. Each member's
profile cache keeps its share per setting (:class:`~p2ptrain.plan.LocalProfile`), so a
warm job whose sharing members all remember one for their settings skips the pass too.
On the testbed the pass cost a warm start 0.8-1.0 s, and its answer moved from run to run
on the same setting (docs/performance.md, the fourteenth session).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from p2ptrain.plan._probe import SPEED_PROBE_S, cpu_demand, host_cores, host_key, speed_probe
from p2ptrain.plan._window import Window, window_input
from p2ptrain.ring import Collectives

__all__ = ["host_setting", "probe_together"]

log = logging.getLogger(__name__)


def host_setting(demand: float, sharing: list[float], cores: float, window: Window) -> str:
    """What a member's shared-host share depends on: the host's cores, the CPU demands
    (:func:`~p2ptrain.plan._probe.cpu_demand`) of the members on it and this member's own, and the layers it runs."""
    quotas = ",".join(f"{d:.3f}" for d in sorted(sharing))
    return f"cores {cores:g}; on host {quotas}; mine {demand:.3f}; layers {window.first}-{window.last}"


async def probe_together(coll: Collectives, on: list[Any], x: Any, solo_s: float, *, pool: Any = None,
                         warm: bool = True, window: Window | None = None, host: int | None = None,
                         remembered: dict[str, float] | None = None) -> float:
    """The share of its own speed this member keeps while every member computes; every member calls this.

    Args:
        coll: the view's collectives.
        on: the layers on this member's device.
        x: one micro-batch of the model's inputs (the one ``solo_s`` is for).
        solo_s: seconds of one pass of ``window`` on ``x`` with the device to itself (the
            turns' fit).
        warm: run one untimed pass first (False when this member's probes just ran the
            model in this process).
        window: the layers to run (as the turns ran them; None: all).
        host: this member's :func:`~p2ptrain.plan._probe.host_key` (None: this host's).
        remembered: shares this member measured before, by :func:`host_setting` (its
            profile cache's); a share measured here is added to it.

    Returns:
        ``solo_s`` over the pass time measured together, at most 1; 1.0 without a pass
        when no two members share a host (devices on their own hardware cannot slow
        each other's compute); the remembered share without a pass when every member
        that shares a host remembers one for its setting.

    The passes run for ``SPEED_PROBE_S / 2`` or 1.5 times the slowest member's solo pass,
    whichever is longer, so every member's passes overlap the others'.
    """
    loop = asyncio.get_running_loop()
    mine = host_key() if host is None else host
    demand = cpu_demand(x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    rows = await coll.all_gather(torch.tensor([solo_s, float(mine), demand, float(host_cores())], dtype=torch.float64))
    hosts = [int(r[1].item()) for r in rows]
    if len(set(hosts)) == len(hosts):
        return 1.0
    window = Window(0, len(on) - 1) if window is None else window
    sharing = [float(r[2].item()) for r, h in zip(rows, hosts) if h == mine]
    setting = host_setting(demand, sharing, max(float(r[3].item()) for r, h in zip(rows, hosts) if h == mine), window)
    known = None if len(sharing) < 2 or remembered is None else remembered.get(setting)
    # Every member that shares a host has measured its share in this setting before: no pass.
    answers = await coll.all_gather(torch.tensor([float(len(sharing) < 2 or known is not None)], dtype=torch.float64))
    if all(a.item() == 1.0 for a in answers):
        return 1.0 if known is None else known
    probed = on[window.first : window.last + 1]
    # The window's inputs, and one untimed pass: with cached figures nothing has run this
    # model in this process yet, and a first pass's allocations and kernel set-up would be
    # timed too.
    fed = await loop.run_in_executor(pool, window_input, on, x, window)
    if warm:
        await loop.run_in_executor(pool, speed_probe, probed, fed, 0.0)
    await coll.barrier()  # every member (warm or not: collectives pair by count); the timed passes start together
    duration = max(SPEED_PROBE_S / 2, 1.5 * max(float(r[0].item()) for r in rows))
    together = await loop.run_in_executor(pool, speed_probe, probed, fed, duration)
    await coll.barrier()  # nobody times links while someone still computes
    kept = min(1.0, solo_s / together)
    log.debug("together pass of %.3f s (solo %.4f s a pass, together %.4f s): keeps %.3f", duration, solo_s, together, kept)
    if remembered is not None and len(sharing) > 1:
        remembered.pop(setting, None)  # the newest last
        remembered[setting] = kept
    return kept
