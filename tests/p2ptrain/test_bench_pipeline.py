"""``bench pipeline``'s own arithmetic: probed speeds set beside the testbed's CPU caps."""

from __future__ import annotations

import json
import re

import pytest

from p2ptrain.bench._pipeline import _add_caps


def test_probed_speeds_are_set_beside_each_members_cap_by_node_id() -> None:
    res = {"probe": {"node_ids": ["b", "a", "c"], "speed": [0.5, 1.0, 0.2]}}
    outs = [json.dumps({"node_id": n}) + "\n" for n in ("a", "b", "c")]  # launched as dev0, dev1, dev2
    outs[0] += json.dumps({"achieved_sps": 1.0}) + "\n"  # the reporting member's result comes last
    _add_caps(res, outs, [1.0, 0.5, 0.25])
    assert res["probe"]["cpus"] == [0.5, 1.0, 0.25]
    assert res["probe"]["speed_vs_cap"] == [1.0, 1.0, 0.8]  # the third probed 20% under its cap
    assert res["probe_ratio"] == 5.0 and res["cap_ratio"] == 4.0


def test_no_caps_outside_a_testbed() -> None:
    res = {"probe": {"node_ids": ["a"], "speed": [1.0]}}
    _add_caps(res, [json.dumps({"node_id": "a"})], [None])
    assert "cpus" not in res["probe"] and "cap_ratio" not in res


def test_too_few_steps_to_time_is_refused_before_any_member_starts() -> None:
    import argparse

    import pytest

    from p2ptrain._errors import ConfigError
    from p2ptrain.bench._pipeline import WARMUP, add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # --steps 5 once timed one gap, the back-to-back last two reports: 26276 samples/s.
    with pytest.raises(ConfigError, match=f"at least {WARMUP + 5}"):
        main(parser.parse_args(["--steps", str(WARMUP + 4)]))


def test_a_wrong_model_keyword_is_refused_before_any_member_starts() -> None:
    import argparse

    import pytest

    from p2ptrain._errors import JobError
    from p2ptrain.bench._pipeline import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # It once reached the members, failed in the reporting one, and the bench waited a
    # minute more for the others and died of a TimeoutExpired traceback.
    with pytest.raises(JobError, match=r"\['d_model'\] is not a parameter of zoo model 'tinygpt'"):
        main(parser.parse_args(["--model-arg", "d_model=384"]))


def test_the_reporting_members_stage_is_set_beside_its_prediction() -> None:
    from types import SimpleNamespace

    from p2ptrain.bench._pipeline import _own_stage

    stages = [SimpleNamespace(node_ids=("a",), first_layer=0, last_layer=2, compute_s=0.1),
              SimpleNamespace(node_ids=("b", "c"), first_layer=3, last_layer=5, compute_s=0.2)]
    plan = SimpleNamespace(stages=stages)
    # (kind, micro, start, end): forwards of 0.05-0.07 s, backwards of 0.1-0.3 s, an optimizer step.
    ops = [(0, 0, 0.0, 0.05), (0, 1, 1.0, 1.06), (0, 2, 2.0, 2.07), (1, 0, 3.0, 3.1), (1, 1, 4.0, 4.3), (1, 2, 5.0, 5.2),
           (2, -1, 6.0, 9.0)]
    trainer = SimpleNamespace(timeline=ops)
    assert _own_stage(plan, "c", trainer) == {"layers": [3, 5], "predicted": 0.2, "measured": 0.26}
    assert _own_stage(plan, "z", trainer) is None  # left out of the plan
    assert _own_stage(plan, "a", SimpleNamespace(timeline=[])) is None


def test_the_benchs_verbosity_reaches_its_members() -> None:
    # Its error said "rerun with -v for logs", but the members never got the -v: their
    # logs stayed silent and only the bench's own testbed lines showed.
    import argparse

    from p2ptrain.bench._pipeline import add_arguments, worker_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "mlp"])
    args.verbose = 2  # the top-level -vv
    argv = worker_args(args, "c", {})
    assert argv[argv.index("--verbose") + 1] == "2" and argv[argv.index("--model") + 1] == "mlp"


def test_the_start_phases_add_up_to_the_start() -> None:
    from p2ptrain.bench._pipeline import _start_phases

    agreement = {"local_s": 0.5, "barrier_s": 0.0, "probe_s": 2.0, "link_s": 0.25, "gather_s": 0.01, "plan_s": 0.04,
                 "cached": 0.0, "probed": 0.124}  # flags, not seconds: not counted
    got = _start_phases(agreement, start_s=5.0, after_s=1.5)
    assert got["after_plan_s"] == 1.5
    assert abs(got["offer_s"] - 0.7) < 1e-9  # what the agreement and the steps after it leave of the start
    assert abs(sum(v for k, v in got.items() if k.endswith("_s")) - 5.0) < 1e-9
    assert got["cached"] == 0.0 and got["probed"] == 0.124


@pytest.mark.parametrize(("bench", "argv", "message"), [
    # A second walkthrough: each started its members, then died of a member's traceback or
    # "a worker failed with exit code 1" with the cause hidden (bench allreduce).
    ("embed", ["--model-arg", "n_head=5"], "n_embd=64 is not a multiple of n_head=5"),
    ("pipeline", ["--model-arg", "n_head=5"], "n_embd=64 is not a multiple of n_head=5"),
    ("recovery", ["--codec", "int8:0"], "bad int8 block size '0'"),
    ("allreduce", ["--codec", "topk:2"], "bad topk fraction '2'"),
    ("allreduce", ["--codec", "bogus"], "unknown codec 'bogus'"),
    ("allreduce", ["--size", "0"], "--size 0 is not a positive whole number"),
])
def test_a_bench_refuses_what_its_members_would_before_any_starts(bench: str, argv: list[str], message: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import multiprocessing
    import subprocess

    from p2ptrain._errors import P2PTrainError
    from p2ptrain.cli._main import build_parser

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", lambda *a: pytest.fail("a process was started"))
    args = build_parser().parse_args(["bench", bench, *argv])
    with pytest.raises(P2PTrainError, match=re.escape(message)):
        importlib.import_module(f"p2ptrain.bench._{bench}").main(args)



def test_thread_cpu_counts_the_loop_thread_and_the_others_apart() -> None:
    import threading
    import time

    from p2ptrain.bench._pipeline import thread_cpu_s

    def spin(s: float) -> None:
        end = time.thread_time() + s
        while time.thread_time() < end:
            pass

    before = thread_cpu_s()
    spin(0.3)  # the main thread, where a member's event loop runs
    mid = thread_cpu_s()
    assert mid["loop"] - before["loop"] >= 0.2
    done = threading.Event()
    worker = threading.Thread(target=lambda: (spin(0.3), done.wait(10)))  # alive until read: ended threads drop out
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while thread_cpu_s().get("python", 0.0) - mid.get("python", 0.0) < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = thread_cpu_s()
    finally:
        done.set()
        worker.join()
    assert after.get("python", 0.0) - mid.get("python", 0.0) >= 0.2
    assert after["loop"] - mid["loop"] < 0.15  # the main thread only waited
