"""The compute thread's pool: training is background work, so its thread yields the CPU to the host's.

A trainer runs forward, backward and the optimizer on one thread of its own (the STYLE
rule: torch compute off the event loop). On a robot that thread shares a few cores with
the host program's control loop, and the kernel's scheduler treats them as equals
unless told otherwise. :func:`compute_pool` makes that thread :data:`COMPUTE_NICE`
steps nicer than the process (Linux: ``setpriority`` on the thread id changes that
thread alone and needs no privilege to lower a priority), so when both want a core the
host's threads win. The OpenMP team torch starts from the compute thread (intra-op
threads) inherits its niceness; threads that were created before, elsewhere, do not.

The environment variable :data:`COMPUTE_NICE_ENV` sets the step (``0`` turns it off).

Only work that spends its time in torch kernels (which release the GIL) runs there: a
nicer thread that holds the GIL for long stretches (imports, building a dataset or an
optimizer) would make the host's loop wait for it the longer whenever the core is
contended (priority inversion), so that set-up stays on the host's executor.

:func:`warm_process` does a process's one-time training work ahead of its first job, and
:func:`freeze_startup` keeps what start-up left alive out of the collector's full passes.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import os
import sys
import threading

from p2ptrain._errors import ConfigError

__all__ = ["COMPUTE_NICE", "COMPUTE_NICE_ENV", "compute_nice", "compute_pool", "freeze_startup", "lower_priority", "warm_process"]

log = logging.getLogger(__name__)

# How many nice steps the compute thread runs below its process. CFS weighs nice 0 at
# 1024 and nice 10 at 110, so while the host's thread wants the core it gets about 90%
# of it; on an idle core the compute thread still runs at full speed (niceness shares
# CPU time, it does not cap it). 10 is also what `nice` uses when not told a value. The
# members of a ring all lower theirs alike, so their speeds relative to each other stay.
COMPUTE_NICE = 10
COMPUTE_NICE_ENV = "P2PTRAIN_COMPUTE_NICE"
_MAX_NICE = 19  # Linux's least favoured niceness


def compute_nice() -> int:
    """The step :func:`compute_pool` applies: :data:`COMPUTE_NICE_ENV` if set, else :data:`COMPUTE_NICE`.

    Raises:
        ConfigError: the variable is not an integer in 0..19.
    """
    raw = os.environ.get(COMPUTE_NICE_ENV, "").strip()
    if not raw:
        return COMPUTE_NICE
    try:
        step = int(raw)
    except ValueError:
        step = -1
    if not 0 <= step <= _MAX_NICE:
        raise ConfigError(f"{COMPUTE_NICE_ENV}={raw!r} is not an integer in 0..{_MAX_NICE}; "
                          f"use 0 to leave the compute thread at the process's priority, or unset it for {COMPUTE_NICE}")
    return step


def lower_priority(step: int) -> None:
    """Make the calling thread ``step`` nice steps nicer than its process (capped at 19); never raises.

    Relative to the process, not to the calling thread: a thread inherits the niceness of
    the thread that started it, so one started from an already nicer thread would
    otherwise drift to 19.

    A no-op for ``step <= 0`` and off Linux (elsewhere ``setpriority`` on a thread id is not
    a per-thread call); a refusal is logged at debug level and training goes on.
    """
    if step <= 0 or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        target = min(_MAX_NICE, os.getpriority(os.PRIO_PROCESS, os.getpid()) + step)  # the main thread's
        if target > os.getpriority(os.PRIO_PROCESS, tid):  # raising a priority needs privilege; never asked
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except (AttributeError, OSError) as exc:
        log.debug("could not lower the compute thread's priority by %d: %s", step, exc)


def compute_pool(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A one-thread pool for a trainer's compute whose thread runs :func:`compute_nice` steps nicer.

    Args:
        name: the thread's name prefix (``p2ptrain-compute``, ``p2ptrain-stage``).

    Raises:
        ConfigError: :data:`COMPUTE_NICE_ENV` is malformed.
    """
    step = compute_nice()
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name, initializer=lower_priority, initargs=(step,))


def warm_process() -> None:
    """Do a process's one-time training work (blocking: run it on a worker thread).

    What :meth:`~p2ptrain.train.JobService.warm_up` does before a node's first job; a
    process that starts its node only once warm (a benchmark's members) calls it directly.
    """
    import torch

    from p2ptrain.zoo import default_optimizer

    layer = torch.nn.Linear(4, 4)
    opt = default_optimizer(layer.parameters(), 1e-3)  # the first optimizer imports torch._dynamo
    layer(torch.zeros(2, 4)).sum().backward()
    opt.step()


def freeze_startup() -> None:
    """Keep what is alive now out of the garbage collector's full passes (``gc.freeze``).

    A process that has imported torch holds 200-300 thousand objects the cyclic collector
    tracks, and its full (oldest-generation) pass walks them all with the GIL held: 66-132 ms
    in the middle of a 4-second demo job here, in every member, during which no thread
    of the process runs Python (the event loop, its hops and heartbeats included). After
    this call those passes walk only objects made since: a job's. Objects alive now (the
    modules, classes and functions of the imports, mostly) are never collected as cycles
    afterwards; reference counting still frees them.

    Process-wide, so like ``keep_heap_warm`` it is the entry point's decision, made once
    its imports and warm-up are done (``p2ptrain join``, ``train``, ``demo`` and the bench
    members do); a robot program embedding a node may do the same after its own start-up.
    """
    gc.collect()  # what is garbage already is freed, not frozen
    gc.freeze()
