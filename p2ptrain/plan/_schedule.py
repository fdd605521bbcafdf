"""Pipeline schedules: the order in which one stage runs its forwards and backwards.

A schedule is a pure function ``(stage, stages, micro) -> list[Op]``: every stage of a
pipeline computes its own op list from the agreed plan, with no messages about the
order. The executor walks the list; an op waits for its input (the activation from
the previous stage, or the gradient from the next) and nothing else.

Two schedules, both "synchronous" (one optimizer step after all micro-batches, so
the result equals one device training on the whole batch):

- ``gpipe`` (GPipe, Huang et al. 2019): all forwards, then all backwards. Simple, but
  every stage holds the activations of all ``micro`` micro-batches at its peak.
- ``1f1b`` (the "PipeDream-Flush" order of PipeDream-2BW / Megatron-LM): a few
  warm-up forwards, then alternate one forward with one backward, then drain. Same
  bubble as GPipe, but stage ``s`` holds at most ``stages - s`` micro-batches of
  activations, independent of ``micro``: that is what lets small-memory edge devices
  use many micro-batches (a small bubble).

Backwards run in ascending micro-batch order in both schedules, so every stage sends
and receives gradients in the same order as activations (FIFO queues suffice) and
frees its oldest activations first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

from p2ptrain._errors import ConfigError

__all__ = ["SCHEDULES", "Op", "gpipe", "max_in_flight", "one_f_one_b", "schedule"]


class Op(NamedTuple):
    """One unit of work of a stage: the forward or the backward of one micro-batch.

    Attributes:
        kind: ``"fwd"`` or ``"bwd"``.
        micro: micro-batch index, ``0 <= micro < micro_batches``.
    """

    kind: Literal["fwd", "bwd"]
    micro: int


def _check(stage: int, stages: int, micro: int) -> None:
    if stages < 1:
        raise ConfigError(f"a pipeline needs at least 1 stage, got stages={stages}")
    if not 0 <= stage < stages:
        raise ConfigError(f"stage={stage} is out of range for a pipeline of {stages} stages; use 0..{stages - 1}")
    if micro < 1:
        raise ConfigError(f"a step needs at least 1 micro-batch, got micro={micro}")


def gpipe(stage: int, stages: int, micro: int) -> list[Op]:
    """GPipe order: forwards ``0..micro-1``, then backwards ``0..micro-1``.

    Args:
        stage: this stage's index, ``0 <= stage < stages``.
        stages: stages in the pipeline.
        micro: micro-batches per training step.

    Returns:
        ``2 * micro`` ops; the stage holds ``micro`` micro-batches of activations at
        its peak.

    Raises:
        ConfigError: an argument is out of range.
    """
    _check(stage, stages, micro)
    return [Op("fwd", m) for m in range(micro)] + [Op("bwd", m) for m in range(micro)]


def one_f_one_b(stage: int, stages: int, micro: int) -> list[Op]:
    """1F1B order: warm-up forwards, steady one-forward-one-backward, cool-down backwards.

    Stage ``s`` first runs ``w = min(stages - s - 1, micro)`` forwards (enough to keep
    the stages after it busy until the first gradient comes back), then alternates
    forward ``w + i`` with backward ``i``, and ends with the remaining backwards. The
    last stage has no warm-up: it turns each forward straight into a backward.

    Args:
        stage: this stage's index, ``0 <= stage < stages``.
        stages: stages in the pipeline.
        micro: micro-batches per training step.

    Returns:
        ``2 * micro`` ops; at most ``min(stages - stage, micro)`` micro-batches are in
        flight (forward done, backward not yet) at any point.

    Raises:
        ConfigError: an argument is out of range.
    """
    _check(stage, stages, micro)
    warmup = min(stages - stage - 1, micro)
    ops = [Op("fwd", m) for m in range(warmup)]
    for i in range(micro - warmup):
        ops.append(Op("fwd", warmup + i))
        ops.append(Op("bwd", i))
    ops.extend(Op("bwd", m) for m in range(micro - warmup, micro))
    return ops


SCHEDULES: Mapping[str, Callable[[int, int, int], list[Op]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def schedule(name: str, stage: int, stages: int, micro: int) -> list[Op]:
    """The op list of schedule ``name`` (a key of :data:`SCHEDULES`) for one stage.

    Raises:
        ConfigError: unknown schedule name, or an argument out of range.
    """
    fn = SCHEDULES.get(name)
    if fn is None:
        raise ConfigError(f"unknown pipeline schedule {name!r}; use one of {', '.join(sorted(SCHEDULES))}")
    return fn(stage, stages, micro)


def max_in_flight(ops: Sequence[Op]) -> int:
    """Most micro-batches whose forward is done and backward is not, along ``ops``.

    This is how many micro-batches of activations the stage keeps alive at its peak
    (the memory the planner budgets for).
    """
    live = peak = 0
    for op in ops:
        live += 1 if op.kind == "fwd" else -1
        peak = max(peak, live)
    return peak
