"""Each member's own speed, probed in interleaved turns (step 2 of :func:`~p2ptrain.plan.agree_on_plan`).

A member's speed is what its own device can do, not what its neighbours' probes leave
of a shared host: measured on the 2-core testbed host, probing all at once put the
1.0 : 0.25-core ratio anywhere from 4.5 to 8.5. So members that share a host (the same
running kernel: ``/proc/sys/kernel/random/boot_id``, which network namespaces and
containers share) take turns, and the turns interleave: in each of ``SPEED_ROUNDS``
rounds every member that has no cached figures probes once (a pass of its micro-batch
and one of a quarter of it, about ``SPEED_PROBE_S / SPEED_ROUNDS`` seconds) while its
host's other members wait at a barrier — unless their CPU shares leave the host room:
members of one host whose cgroup quotas (a testbed's caps, a container's limit) add up to
at most half the host's cores (``PROBE_SHARE``) probe in the same turn, since capped
processes on cores the host has to spare do not slow each other (hetero4's 1.0, 0.5,
0.25 and 0.25 cores on a 2-core host: two turns, not four). An uncapped member, or one
on an accelerator, takes a turn of its own. Members on hosts of their own probe at the
same time (one turn per round for a ring of separate devices), so the turns cost a
round's time per turn of the most crowded host, not per member. A burst of someone else's load
then falls on one repeat of several members rather than on all the repeats of one.
Such noise only ever slows a repeat (measured on the testbed: repeats 20-35% over the
device's usual time, a third of them in some runs, never under it by more than a CFS
period's share), so the fastest repeat of each size is the device's capacity: with
the median, a device whose turns met the bursts twice in three rounds was planned at
0.72 of a device it matches within 10%. The repeats' coefficient of variation says how
stable the device is (``Device.speed_cv``). The fit ``t(n) = fixed + n * per_sample``
of the two sizes' fastest repeats splits the pass into a per-sample and a fixed part (a
group member runs only its share of each micro-batch, and on a slow CPU the fixed
per-pass cost is a large part of a small share). Training meets the same noise, so a
step takes longer than the fastest repeats say: each member also reports its median
repeat over its fastest (``Speed.typical``), and the plan prices every device's time at
the ring's median of those (:func:`~p2ptrain.plan.agree_on_plan`): capacities rank the
devices, the ring's typical slowdown sets the absolute times.

While a member probes, it pings a partner once per round (the next member in ring order
that is not probing in the same turn; its successor when every member probes at once):
half the median round trip is what a message hop costs it *while it computes* (on a ring
of separate devices that all probe at once, the answer is a busy member's too: a pipeline
hop's other end is usually busy as well) (under a CPU cap the
messaging thread waits for the quota the compute thread leaves: up to 7.5 ms of every
10 ms at 0.25 core, which an idle ping never sees), the per-op overhead the planner
charges its stage. Its first turn also times an optimizer update and a gradient sum.

A model whose whole pass would take seconds on a member is probed on a window of its
layers (:mod:`p2ptrain.plan._window`). Models whose passes still outlast
``SPEED_PROBE_S`` stop after ``LONG_ROUNDS``, as all members agree after the first round.

Then, when some members share a host, every member computes at once
(:mod:`p2ptrain.plan._together`): how much of its speed each keeps while the others compute.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import socket
import statistics
import time
from typing import Any, NamedTuple

import torch

from p2ptrain._device import synchronize
from p2ptrain.discovery import affinity_cores, cpu_quota
from p2ptrain.plan._window import Window, window_input
from p2ptrain.ring import Collectives, Node, View, send_or_fail
from p2ptrain.zoo import Workload

__all__ = ["LONG_ROUNDS", "PROBE_SHARE", "SPEED_PROBE_S", "SPEED_ROUNDS", "UPDATE_PROBE_BYTES", "Speed", "SpeedProbe",
           "cgroup_key", "cpu_demand", "host_cores", "host_key", "probe_in_turns",
           "probe_quota", "quota_seconds", "speed_probe", "timed_passes", "turns"]

# Seconds of whole-model forward+backward per member over all rounds. CPU caps (cgroup
# CFS quotas, 10-100 ms periods) only show over many periods: each round's pass of each
# size spans several (0.6 s / 5 rounds / 2 sizes = 60 ms, six 10 ms testbed periods).
SPEED_PROBE_S = 0.6
SPEED_ROUNDS = 5
LONG_ROUNDS = 3
# The optimizer update is timed on the parameters of every layer up to this many bytes
# (the window's alone could fit a cache the whole model's state does not). AdamW reads
# and writes four bytes of state per parameter byte, so 16 MiB of parameters is 64 MiB
# of traffic, past the caches: on a 57 MB model it priced the update within 2% of 64 MiB
# and of the real step (53 ms), in a third of the time (0.10 s against 0.30 s on a core;
# on a quarter-core device the 64 MiB probe held up every member's first round by 3.2 s).
# 4 MiB fits a cache and priced it at two thirds.
UPDATE_PROBE_BYTES = 16 << 20
# Members of one host probe in one turn while their CPU quotas add up to at most this
# share of its cores: the rest is left to their event loops and to everything else.
PROBE_SHARE = 0.5

_BUSY, _BUSY_ACK = "pp.busy", "pp.busy.ack"

log = logging.getLogger(__name__)


class Speed(NamedTuple):
    """What a member's turns measured (seconds; see the module docstring)."""

    per_sample_s: float
    fixed_s: float
    cv: float
    update_s: float  # per parameter byte
    reduce_s: float  # per gradient byte
    busy_hop_s: float  # 0 when alone in the view
    typical: float = 1.0  # the median wall repeat over the fastest (>= 1): how much the host's noise slows it


def timed_passes(layers: list[Any], x: Any, duration_s: float) -> tuple[int, float, float, float]:
    """Whole-model forward+backward passes on ``x`` for ``duration_s`` (one at least).

    Returns:
        ``(passes, wall seconds, process CPU seconds, this thread's CPU seconds)``.
    """
    params = [p for m in layers for p in m.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    n, t0, c0, th0 = 0, time.perf_counter(), time.process_time(), time.thread_time()
    while True:
        h = x
        for m in layers:
            h = m(h)
        h.float().sum().backward()
        x.grad = None  # a window's hidden-state input: its gradient is computed, not kept
        n += 1
        synchronize(x.device)  # an accelerator's kernels finish before the clock is read
        if time.perf_counter() - t0 >= duration_s:
            break
    wall, cpu_s, thread_s = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - th0
    for p, g in zip(params, grads):  # leave the gradients as they were
        p.grad = g
    return n, wall, cpu_s, thread_s


def speed_probe(layers: list[Any], x: Any, duration_s: float = SPEED_PROBE_S) -> float:
    """Wall seconds per whole-model forward+backward on ``x``, averaged over ``duration_s`` (one pass at least)."""
    n, wall, _, _ = timed_passes(layers, x, duration_s)
    return wall / n


def quota_seconds(cpu_s: float, thread_s: float, quota: float) -> float:
    """What a pass costs a process under a CPU quota of ``quota`` cores (see :func:`probe_quota`):
    its CPU seconds over the quota, or the probing thread's own CPU seconds where that is
    more (a quota over one core and one compute thread)."""
    return max(thread_s, cpu_s / quota)


def probe_quota(device: torch.device) -> float | None:
    """The cgroup CPU quota of a capped CPU member (a testbed device, a limited container), else None.

    A quota's seconds are the device's own capacity: under a quota of ``q`` cores a busy
    process runs ``q`` of every period and waits the rest, so a pass's wall time depends
    on where in the periods it starts and ends (on the testbed's 10 ms periods, up to
    7.5 ms of a 20 ms pass at a quarter core) and on what else the host runs, while its
    CPU seconds over ``q`` are what the quota gives it. A capped member's speed is
    therefore fitted on :func:`quota_seconds`; its wall-clock repeats still set how much
    the host's noise slows it (``Speed.typical``). Measured on hetero4: the wall clock
    put the capped devices at 0.85-1.41 of their caps' ratio, run to run; quota seconds
    at 0.80-1.0. Uncapped members and accelerators keep the wall clock.
    """
    if device.type != "cpu":
        return None
    quota = cpu_quota()
    if quota is None:
        return None
    return quota if quota < affinity_cores() else None  # a quota of every core it may use caps nothing


def update_probe(w: Workload, layers: list[Any], limit: int = UPDATE_PROBE_BYTES) -> float:
    """Seconds per parameter byte of one optimizer update (on copies: the model is untouched).

    The copies are of the layers' parameters in order, up to ``limit`` bytes (one at
    least): past the caches, as a big model's state is, without copying all of it.
    """
    copies: list[Any] = []
    held = 0
    for p in (p for m in layers for p in m.parameters()):
        if copies and held + p.numel() * p.element_size() > limit:
            break
        copies.append(p.detach().clone().requires_grad_(True))
        held += p.numel() * p.element_size()
    if not copies:
        return 0.0
    for c in copies:
        c.grad = torch.full_like(c, 1e-3)
    opt = w.make_optimizer(copies, 1e-3)
    opt.step()  # the first update allocates the state
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < 0.05:
        opt.step()
        n += 1
    nbytes: int = sum(c.numel() * c.element_size() for c in copies)  # the copies are typed Any
    return (time.perf_counter() - t0) / n / nbytes


def reduce_probe() -> float:
    """Seconds per byte of adding one fp32 gradient buffer into another (an all-reduce's sums)."""
    a, b = torch.zeros(1 << 20), torch.ones(1 << 20)  # 4 MiB each: past the caches, as gradients are
    a.add_(b)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < 0.02:
        a.add_(b)
        n += 1
    return (time.perf_counter() - t0) / n / (a.numel() * 4)


def micro_input(w: Workload, micro_batch: int) -> Any:
    """The inputs of a micro-batch of ``micro_batch`` samples (the first ones)."""
    x, _ = w.split(w.batch(list(range(micro_batch))))
    return x


class SpeedProbe:
    """One member's speed probe, a repeat per round; its methods run on the compute thread.

    Args:
        w: the workload (its optimizer is timed).
        layers: the model's layers on the host (the update runs there).
        on: the layers on the device that computes (``layers`` on a CPU member).
        mb: the micro-batch size the plan is likely to use.
        device: where ``on`` lives.
        window: the layers the passes run (:func:`~p2ptrain.plan._window.probe_window`;
            None: all); :meth:`fit` scales their figures to the whole model.
        profiled: the layer profile has just run these layers on ``mb`` samples in this
            process, so the first-call allocations of that size are paid and :meth:`warm`
            skips its pass (on a quarter-core device 0.2-0.3 s on every member's critical
            path; a first repeat slower all the same is not the fastest, which the fit takes).
    """

    def __init__(self, w: Workload, layers: list[Any], on: list[Any], mb: int, device: torch.device,
                 window: Window | None = None, *, profiled: bool = False) -> None:
        self.w, self.layers, self.on, self.mb, self.profiled = w, layers, on, mb, profiled
        self.window = Window(0, len(on) - 1) if window is None else window
        self.small = max(1, mb // 4)
        sizes = [mb] + ([self.small] if self.small < mb else [])
        self.raw = [micro_input(w, n).to(device) for n in sizes]  # the model's inputs
        self.inputs = self.raw  # what the passes take: warm() feeds the raw ones through to the window
        self.quota = probe_quota(device)
        self.times: list[list[float]] = [[] for _ in self.inputs]  # seconds per pass: quota seconds when capped
        self.walls: list[float] = []  # the micro-batch's wall seconds per pass
        self.update_s = self.reduce_s = 0.0

    @property
    def probed(self) -> list[Any]:
        """The layers the passes run (the window's, on the computing device)."""
        return self.on[self.window.first : self.window.last + 1]

    def warm(self) -> None:
        """The window's inputs, then one pass of each size the process has not run: first-call allocations are not timed."""
        self.inputs = [window_input(self.on, x, self.window) for x in self.raw]
        for k, x in enumerate(self.inputs):
            if not (k == 0 and self.profiled):
                speed_probe(self.probed, x, 0.0)

    def round(self, rounds: int = SPEED_ROUNDS) -> float:
        """One repeat of each size (the first round also times the update and a sum).

        Returns:
            The seconds of the repeats (not of the update and the sum).
        """
        t0 = time.perf_counter()
        for k, x in enumerate(self.inputs):
            n, wall, cpu_s, thread_s = timed_passes(self.probed, x, SPEED_PROBE_S / rounds / len(self.inputs))
            cost = wall if self.quota is None else quota_seconds(cpu_s, thread_s, self.quota)
            cost = cost if cost > 0 else wall  # a CPU clock too coarse to move: the wall clock
            self.times[k].append(cost / n)
            if k == 0:
                self.walls.append(wall / n)
        took = time.perf_counter() - t0
        if len(self.times[0]) == 1:
            t1 = time.perf_counter()
            self.update_s, self.reduce_s = update_probe(self.w, self.layers), reduce_probe()
            log.debug("update and sum probes %.3f s", time.perf_counter() - t1)
        return took

    def fit(self, busy_hop_s: float = 0.0) -> Speed:
        """The figures of the rounds so far (at least one)."""
        big = self.times[0]
        t_big, cv = min(big), statistics.pstdev(self.walls) / statistics.fmean(self.walls)
        per_sample, fixed = t_big / self.mb, 0.0
        if self.small < self.mb:
            slope = (t_big - min(self.times[1])) / (self.mb - self.small)
            if slope > 0:  # else noise swamped the difference: no fixed part
                per_sample, fixed = slope, max(0.0, t_big - slope * self.mb)
        # The clock's usual pass over the capacity's: the host's noise (and, when capped,
        # the quota's periods) as a step will meet them.
        typical = max(1.0, statistics.median(self.walls) / t_big) if t_big > 0 else 1.0
        per_sample, fixed = self.window.whole(per_sample, fixed)
        return Speed(per_sample, fixed, cv, self.update_s, self.reduce_s, busy_hop_s, typical)


def speed_fit(probe: SpeedProbe, rounds: int = SPEED_ROUNDS) -> Speed:
    """All of ``probe``'s rounds at once, no turns (a member alone, and tests)."""
    probe.warm()
    for _ in range(rounds):
        probe.round(rounds)
    return probe.fit()


def host_key() -> int:
    """This host's identity as a 48-bit integer (exact in a float64): its running kernel's boot id.

    Processes in network namespaces or containers of one machine share it, and so share
    its CPUs; separate devices do not. Without the boot id: the host name.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            ident = f.read().strip()
    except OSError:  # the host name: stable in every process (a MAC may be a random stand-in)
        ident = socket.gethostname()
    return int.from_bytes(hashlib.sha256(ident.encode()).digest()[:6], "big")


def host_cores() -> int:
    """The host's cores (all of them, whatever this process's affinity)."""
    return os.cpu_count() or 1


def cpu_demand(device: torch.device) -> float:
    """The cores a probe on ``device`` keeps busy: a CPU member's cgroup quota (:func:`probe_quota`);
    an uncapped member, or one on an accelerator, counts as the whole host."""
    quota = probe_quota(device)
    return float(host_cores()) if quota is None else quota


def cgroup_key() -> int:
    """This process's cgroup as a 48-bit integer (exact in a float64): processes of one
    cgroup share its CPU quota, so they never probe in one turn. 0 where unknown."""
    try:
        with open("/proc/self/cgroup", "rb") as f:
            text = f.read(64 << 10)
    except OSError:
        return 0
    return int.from_bytes(hashlib.sha256(text).digest()[:6], "big")


def turns(probing: list[bool], hosts: list[int], demand: list[float] | None = None,
          cores: list[float] | None = None, cgroups: list[int] | None = None) -> list[list[int]]:
    """Which members probe in each turn of a round (indices into the view's members).

    Members on one host share a turn while their ``demand`` (cores each keeps busy) adds
    up to at most ``PROBE_SHARE`` of the host's ``cores`` (the most any of its members
    reports) and no two of them are in one cgroup (``cgroups``: they share its quota);
    packed first-fit, the largest demand first, ties in view order. A member over that
    share probes alone. Members of different hosts share turns. When every member
    would probe in one turn and some host has two or more in it, that host's last one
    waits for a second turn: a prober pings a member that is not probing (see
    :func:`partner`), and a busy neighbour on its own host would read as its own hop.
    Without ``demand``, every member of a host takes a turn of its own.
    """
    groups: dict[int, list[int]] = {}
    for k, (p, h) in enumerate(zip(probing, hosts)):
        if p:
            groups.setdefault(h, []).append(k)
    if demand is None or cores is None:  # every member keeps its host busy: a turn each
        demand, cores = [math.inf] * len(probing), [1.0] * len(probing)
    per_host: list[list[list[int]]] = []
    for members in groups.values():
        room = PROBE_SHARE * max(cores[k] for k in members)
        bins: list[tuple[float, list[int]]] = []
        for k in sorted(members, key=lambda k: -demand[k]):
            fit = next((b for b, (used, ks) in enumerate(bins) if used + demand[k] <= room + 1e-9
                        and (cgroups is None or all(cgroups[j] != cgroups[k] for j in ks))), None)
            if fit is None:
                bins.append((demand[k], [k]))
            else:
                used, ks = bins[fit]
                bins[fit] = (used + demand[k], ks + [k])
        per_host.append([sorted(ks) for _, ks in bins])
    if len(probing) > 1 and all(probing) and all(len(t) == 1 for t in per_host):
        crowded = next((t for t in per_host if len(t[0]) > 1), None)
        if crowded is not None:
            crowded[:] = [crowded[0][:-1], crowded[0][-1:]]
    depth = max((len(t) for t in per_host), default=0)
    return [sorted(k for t in per_host if d < len(t) for k in t[d]) for d in range(depth)]


async def probe_in_turns(node: Node, view: View, coll: Collectives, probe: SpeedProbe | None, *, job: str,
                         pool: Any = None, host: int | None = None) -> Speed | None:
    """Every member of ``view`` calls this; those with a ``probe`` (no cached figures) take turns.

    Args:
        host: this member's :func:`host_key` (members with equal keys share a CPU and
            take turns as :func:`turns` packs them; None: this host's).

    Returns:
        This member's figures, or None when it had no probe. Every member returns only
        once every turn is over (nobody is still busy probing).

    Raises:
        PeerFailedError: the view changed meanwhile.
    """
    loop = asyncio.get_running_loop()
    t_start = time.perf_counter()
    if probe is not None:
        await loop.run_in_executor(pool, probe.warm)
    t_warm = time.perf_counter()
    mine = host_key() if host is None else host
    cores = host_cores()
    demand = float(cores) if probe is None else cpu_demand(probe.inputs[0].device)
    row = [0.0 if probe is None else 1.0, float(mine), demand, float(cores), float(cgroup_key())]
    rows = [r.tolist() for r in await coll.all_gather(torch.tensor(row, dtype=torch.float64))]
    schedule = turns([bool(r[0]) for r in rows], [int(r[1]) for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                     [int(r[4]) for r in rows])
    me, rounds, r = node.node_id, SPEED_ROUNDS, 0
    k = view.members.index(me)
    pings: list[float] = []
    log.debug("speed probe turns %s (this member %d); warm-up pass %.3f s", schedule, k, t_warm - t_start)
    while r < rounds:
        took = 0.0
        t_round = time.perf_counter()
        for t, group in enumerate(schedule):
            tag = [view.digest, job, "busy", t, r]
            # Every prober pings its partner (see partner()); answer those that chose this
            # member, beside this member's own turn when it probes too.
            askers = [p for p in group if p != k and partner(p, group, len(view)) == k]
            answers = [asyncio.ensure_future(_answer(node, view, tag + [p], view.members[p])) for p in askers]
            try:
                if k in group:
                    assert probe is not None
                    running = loop.run_in_executor(pool, probe.round, rounds)
                    if len(view) > 1:
                        # At a different point of the round each time: quota periods have phases.
                        await asyncio.wait([running], timeout=SPEED_PROBE_S / rounds / 2 * r / rounds)
                        t0 = time.perf_counter()
                        to = view.members[partner(k, group, len(view))]
                        await send_or_fail(node, to, _BUSY, epoch=view.epoch, tag=tag + [k])
                        await node.take(_BUSY_ACK, tag + [k], epoch=view.epoch)
                        pings.append(time.perf_counter() - t0)
                    took = await running
                for a in answers:
                    await a
            finally:
                for a in answers:
                    a.cancel()
                    if a.done() and not a.cancelled():
                        a.exception()  # retrieved: the turn's own error is the one raised
            await coll.barrier()
        if r == 0 and rounds > LONG_ROUNDS:  # long passes: fewer rounds, agreed by all
            longest = await coll.all_gather(torch.tensor([took], dtype=torch.float64))
            if max(float(t.item()) for t in longest) > SPEED_PROBE_S / LONG_ROUNDS:
                rounds = LONG_ROUNDS
        log.debug("speed probe round %d of %d: %.3f s (own repeats %.3f s)", r, rounds, time.perf_counter() - t_round, took)
        r += 1
    if probe is None:
        return None
    return probe.fit(statistics.median(pings) / 2 if pings else 0.0)


def partner(k: int, group: list[int], n: int) -> int:
    """Whom member ``k`` pings while it probes in a turn with ``group``: the next member in
    ring order that is not probing in this turn, or its successor when all are.

    An idle partner answers at once, so the round trip is this member's own cost of a
    hop while it computes; on a ring of separate devices all probe at once and the
    partner is busy too, as a pipeline hop's other end usually is.
    """
    for step in range(1, n):
        other = (k + step) % n
        if other not in group:
            return other
    return (k + 1) % n


async def _answer(node: Node, view: View, tag: list[Any], asker: str) -> None:
    """Echo ``asker``'s busy ping of ``tag``."""
    await node.take(_BUSY, tag, epoch=view.epoch)
    await send_or_fail(node, asker, _BUSY_ACK, epoch=view.epoch, tag=tag)
