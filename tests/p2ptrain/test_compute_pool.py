"""The trainers' compute thread runs nicer than the host's threads (Linux), and the knob turns it off."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading

import pytest

from p2ptrain._errors import ConfigError
from p2ptrain.train._compute import COMPUTE_NICE, COMPUTE_NICE_ENV, compute_pool
from p2ptrain.train._dataparallel import DataParallelTrainer
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.train.pipeline._trainer import PipelineTrainer, even_split

from _ring import fake_ring

linux = pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is a Linux property")


def _nice_of(tid: int) -> int:
    """A thread's niceness as the kernel shows it: field 19 of /proc/self/task/<tid>/stat."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def _seen_from_inside(pool: concurrent.futures.ThreadPoolExecutor) -> tuple[int, int]:
    """(getpriority, /proc niceness) of the pool's thread, read on that thread."""
    def look() -> tuple[int, int]:
        tid = threading.get_native_id()
        return os.getpriority(os.PRIO_PROCESS, tid), _nice_of(tid)

    return pool.submit(look).result(timeout=10)


def _expected(base: int, step: int) -> int:
    return min(19, base + step)


@linux
def test_a_pool_started_from_a_nicer_thread_is_still_10_below_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # A thread inherits its starter's niceness: relative to itself, a compute thread built
    # on the probe pool's thread would have gone to 19.
    monkeypatch.delenv(COMPUTE_NICE_ENV, raising=False)
    base = _nice_of(threading.get_native_id())
    outer = compute_pool("outer")
    try:
        def start_inner() -> concurrent.futures.ThreadPoolExecutor:
            pool = compute_pool("inner")
            pool.submit(int).result(timeout=10)  # its thread starts here, on the outer pool's thread
            return pool

        inner = outer.submit(start_inner).result(timeout=10)
        try:
            assert _seen_from_inside(outer) == _seen_from_inside(inner) == (_expected(base, COMPUTE_NICE),) * 2
        finally:
            inner.shutdown()
    finally:
        outer.shutdown()


@linux
async def test_both_trainers_compute_on_a_thread_nicer_than_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COMPUTE_NICE_ENV, raising=False)
    base = _nice_of(threading.get_native_id())
    spec = JobSpec(model="mlp", strategy="pipeline", global_batch=8, steps=1, micro_batches=2)
    async with fake_ring(1) as (_, nodes):
        w = resolve(spec)
        trainers = [
            DataParallelTrainer(nodes[0], resolve(spec), global_batch=8, steps=1),
            PipelineTrainer(nodes[0], w, stages=even_split(len(w.layers()), 1),
                            global_batch=8, micro_batches=2, steps=1),
        ]
        try:
            for t in trainers:
                assert _seen_from_inside(t._pool) == (_expected(base, COMPUTE_NICE),) * 2, type(t).__name__
        finally:
            for t in trainers:
                t._pool.shutdown()
    assert _nice_of(threading.get_native_id()) == base, "the caller's thread keeps its priority"


@linux
@pytest.mark.parametrize(("value", "step"), [("0", 0), ("3", 3), (" 19 ", 19)])
def test_the_environment_sets_the_step_and_zero_turns_it_off(monkeypatch: pytest.MonkeyPatch, value: str,
                                                             step: int) -> None:
    monkeypatch.setenv(COMPUTE_NICE_ENV, value)
    base = _nice_of(threading.get_native_id())
    pool = compute_pool("test-compute")
    try:
        assert _seen_from_inside(pool) == (_expected(base, step),) * 2
    finally:
        pool.shutdown()


@pytest.mark.parametrize("value", ["-5", "20", "ten", "1.5"])
def test_a_bad_setting_names_the_variable_and_the_range(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(COMPUTE_NICE_ENV, value)
    with pytest.raises(ConfigError, match=rf"{COMPUTE_NICE_ENV}='{value}' is not an integer in 0\.\.19"):
        compute_pool("test-compute")


@linux
def test_a_refused_setpriority_is_harmless(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError("not allowed here")

    monkeypatch.delenv(COMPUTE_NICE_ENV, raising=False)
    monkeypatch.setattr(os, "setpriority", refuse)
    caplog.set_level(logging.DEBUG, logger="p2ptrain.train._compute")
    pool = compute_pool("test-compute")
    try:
        assert pool.submit(lambda: 41 + 1).result(timeout=10) == 42  # the thread started and works
    finally:
        pool.shutdown()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] and "not allowed here" in caplog.text
