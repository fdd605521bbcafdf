"""Pipeline schedules: complete, causal, memory-bounded, and deadlock-free across stages."""

from __future__ import annotations

import pytest

from p2ptrain._errors import ConfigError
from p2ptrain.plan._schedule import SCHEDULES, Op, gpipe, max_in_flight, one_f_one_b, schedule

GRID = [(s, m) for s in range(1, 5) for m in range(1, 9)]


def simulate(name: str, stages: int, micro: int) -> int:
    """Run every stage's op list against the cross-stage dependencies, unit op times.

    Each stage is one worker running its ops in list order; an op starts in the tick
    after all its inputs finished: fwd m at s needs fwd m at s-1; bwd m at s needs
    bwd m at s+1 and fwd m at s. Returns the makespan in ticks; fails on deadlock.
    """
    lists = [SCHEDULES[name](s, stages, micro) for s in range(stages)]
    pos = [0] * stages
    done: dict[tuple[str, int, int], int] = {}  # (kind, micro, stage) -> finishing tick
    tick = 0
    while any(p < len(ops) for p, ops in zip(pos, lists)):
        tick += 1
        finished = []
        for s, ops in enumerate(lists):
            if pos[s] == len(ops):
                continue
            kind, m = ops[pos[s]]
            if kind == "fwd":
                deps = [("fwd", m, s - 1)] if s > 0 else []
            else:
                deps = [("fwd", m, s)] + ([("bwd", m, s + 1)] if s < stages - 1 else [])
            if all(d in done and done[d] < tick for d in deps):
                finished.append(((kind, m, s), s))
        assert finished, f"{name} deadlocks at tick {tick} with stages={stages} micro={micro}, positions {pos}"
        for key, s in finished:
            done[key] = tick
            pos[s] += 1
    return tick


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_micro_batch_once_each_way_and_backward_after_forward(name: str) -> None:
    for stages, micro in GRID:
        for stage in range(stages):
            ops = SCHEDULES[name](stage, stages, micro)
            assert sorted(ops) == sorted([Op("fwd", m) for m in range(micro)] + [Op("bwd", m) for m in range(micro)])
            where = {op: i for i, op in enumerate(ops)}
            assert all(where[Op("fwd", m)] < where[Op("bwd", m)] for m in range(micro))
            # Gradients leave in the order activations arrived (FIFO queues suffice).
            assert [op.micro for op in ops if op.kind == "bwd"] == list(range(micro))


def test_one_f_one_b_bounds_activations_per_stage() -> None:
    for stages, micro in GRID:
        for stage in range(stages):
            assert max_in_flight(one_f_one_b(stage, stages, micro)) == min(stages - stage, micro)
            assert max_in_flight(gpipe(stage, stages, micro)) == micro


def test_one_f_one_b_shape() -> None:
    assert one_f_one_b(0, 3, 4) == [
        Op("fwd", 0), Op("fwd", 1),
        Op("fwd", 2), Op("bwd", 0), Op("fwd", 3), Op("bwd", 1),
        Op("bwd", 2), Op("bwd", 3),
    ]  # fmt: skip
    assert one_f_one_b(2, 3, 2) == [Op("fwd", 0), Op("bwd", 0), Op("fwd", 1), Op("bwd", 1)]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_no_deadlock_and_the_bubble_the_planner_assumes(name: str) -> None:
    for stages, micro in GRID:
        # Unit fwd and bwd: 2 * (M + S - 1) ticks, the (M + S - 1) x stage-time model.
        assert simulate(name, stages, micro) == 2 * (micro + stages - 1)


def test_schedule_by_name_and_bad_arguments() -> None:
    assert schedule("1f1b", 1, 2, 3) == one_f_one_b(1, 2, 3)
    with pytest.raises(ConfigError, match="unknown pipeline schedule 'pipedream'.*1f1b, gpipe"):
        schedule("pipedream", 0, 1, 1)
    with pytest.raises(ConfigError, match="stage=3 is out of range"):
        gpipe(3, 3, 1)
    with pytest.raises(ConfigError, match="micro=0"):
        one_f_one_b(0, 1, 0)
    with pytest.raises(ConfigError, match="stages=0"):
        one_f_one_b(0, 0, 1)
