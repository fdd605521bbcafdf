"""The dashboard's plain parts, without a network: the report's checks, the ring model, the guards."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import types
from typing import Any

import msgpack
import pytest

from p2ptrain import ConfigError, ProtocolError
from p2ptrain.dashboard import (
    MAX_REPORT_BYTES,
    JobInfo,
    PlanInfo,
    RateLimiter,
    Report,
    RingStatus,
    check_arguments,
    dashboard_token,
    parse_address,
)
from p2ptrain.dashboard._guard import host_allowed, token_matches
from p2ptrain.discovery import Resources
from p2ptrain.ring import MemberInfo
from p2ptrain.train import StepMetrics

JOB = JobInfo(id="a/1/x", model="tinygpt", strategy="data", steps=100, global_batch=24)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def step(n: int, loss: float = 2.0, *, epoch: int = 1, busy: list[float] | None = None, joules: list[float] | None = None) -> StepMetrics:
    return StepMetrics(n, loss, 240.0, 0.1, 0.06, 0.04, 3, epoch, busy or [], joules or [], [False] * len(joules or []))


def info(node_id: str) -> MemberInfo:
    return MemberInfo(node_id, f"tcp://127.0.0.1:{1000 + len(node_id)}", Resources(cores=4, memory_bytes=8 << 30,
                      accelerator="cpu", gflops=50.0, battery=0.5), "member", 1)


def report(**kw: Any) -> dict[str, Any]:
    base = Report(state="member", power="laptop", job=JOB, members=("a", "b", "c"), epoch=1, step=5, loss=2.5,
                  samples_per_s=200.0, step_s=0.1, compute_s=0.05, busy=0.5, joules=1.0, joules_total=6.0,
                  losses=((4, 2.6, 190.0), (5, 2.5, 200.0)), sent_at=1.7e9)
    return dataclasses.replace(base, **kw).to_wire()


# --- the report ------------------------------------------------------------------------------


def test_a_report_survives_the_wire_and_is_small() -> None:
    plan = PlanInfo(((("a",), (4,), 0, 2), (("b", "c"), (2, 2), 3, 5)), 6, "1f1b", 0.05, 480.0)
    wire = report(plan=plan, ops=((0, 1, 1.7e9, 1.7e9 + 0.01),))
    back = Report.from_wire(json.loads(json.dumps(wire)))  # plain data: JSON round-trips it too
    assert back.plan == plan and back.job == JOB and back.losses[-1] == (5, 2.5, 200.0) and back.ops[0][0] == 0
    assert len(msgpack.packb(wire)) < 1024


@pytest.mark.parametrize("bad", [
    {"v": 2}, {"st": "king"}, {"s": "5"}, {"s": -7}, {"l": "nan"}, {"b": 1.5}, {"b": True}, {"j": -1.0},
    {"sps": float("inf")}, {"jm": ["a"] * 65}, {"jm": [7]}, {"ls": [[1, 2.0]]}, {"ls": [[1, 2.0, 3.0]] * 33},
    {"ops": [[0, 1, 5.0, 4.0]]}, {"ops": [[3, 1, 4.0, 5.0]]}, {"job": {"id": "x"}}, {"job": "tinygpt"},
    {"p": {"st": [], "mb": 1, "sched": "1f1b", "ss": 0.1, "sps": 1.0}}, {"p": {"st": [[["a"], [1, 2], 0, 1]], "mb": 1,
                                                                            "sched": "1f1b", "ss": 0.1, "sps": 1.0}},
    {"pw": "x" * 41}, {"m": 1}, {"t": None}, {"extra": "y" * 9000},
])
def test_a_malformed_report_is_refused_with_a_reason(bad: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="bad dashboard report"):
        Report.from_wire({**report(), **bad})


def test_a_nan_loss_is_shown_as_missing_not_refused() -> None:
    back = Report.from_wire(report(loss=math.nan, losses=((5, math.nan, 1.0),)))
    assert back.loss is None and back.losses == ((5, None, 1.0),)


def test_an_oversized_report_is_trimmed_to_fit_before_sending() -> None:
    ops = tuple((0, i, 1.7e9 + i, 1.7e9 + i + 0.5) for i in range(48))
    stages = tuple(((f"member-{i:03d}-" + "x" * 100, f"other-{i:03d}-" + "y" * 100), (1, 1), i, i) for i in range(32))
    losses = tuple((i, 2.0, 100.0) for i in range(32))
    big = Report.from_wire(report())
    big = dataclasses.replace(big, ops=ops, losses=losses, plan=PlanInfo(stages, 4, "1f1b", 0.1, 1.0))
    assert len(msgpack.packb(big.to_wire())) > MAX_REPORT_BYTES
    with pytest.raises(ProtocolError, match="bytes packed"):  # a receiver refuses it whole
        Report.from_wire(big.to_wire())
    small = big.trimmed()
    assert len(msgpack.packb(small.to_wire())) <= MAX_REPORT_BYTES
    back = Report.from_wire(small.to_wire())
    assert back.step == big.step and back.loss == big.loss and back.members == big.members


# --- the ring model --------------------------------------------------------------------------


def test_the_snapshot_merges_this_member_and_the_reports_of_the_others() -> None:
    clock = Clock()
    st = RingStatus("a", power="laptop", clock=clock, wall=lambda: 1.7e9)
    st.on_view(["a", "b", "c"], 3)
    st.on_step(step(5, 2.5, joules=[1.0, 2.0, 3.0]), job=JOB, members=["a", "b", "c"])
    assert st.apply("b", report(busy=0.25, joules=2.0, losses=((3, 2.7, 100.0), (4, 2.6, 110.0))))
    snap = st.snapshot([info("a"), info("b"), info("c")], epoch=3, state="member", cluster="lab")
    json.dumps(snap, allow_nan=False)  # what the server sends
    rows = {m["id"]: m for m in snap["members"]}
    assert rows["a"]["me"] and rows["a"]["joules"] == 1.0 and rows["a"]["busy"] == pytest.approx(0.6)
    assert rows["b"]["busy"] == 0.25 and rows["b"]["power"] == "laptop" and rows["b"]["cores"] == 4
    assert rows["c"]["stale"] and "loss" not in rows["c"]  # it sent nothing: shown, without figures
    assert [p[0] for p in snap["series"]] == [3, 4, 5]  # back-filled from b's report
    assert snap["job"]["model"] == "tinygpt"
    assert [s["members"] for s in snap["plan"]["stages"]] == [["a"], ["b"], ["c"]]
    assert snap["plan"]["stages"][0]["shares"] == [8]
    clock.t += 6
    assert {m["id"]: m["stale"] for m in st.snapshot([info("a"), info("b")], epoch=3, state="member")["members"]} == {
        "a": False, "b": True}


def test_a_member_leaving_the_view_leaves_the_page_and_the_event_says_how() -> None:
    st = RingStatus("a", clock=Clock())
    st.on_view(["a", "b", "c", "d"], 2)
    st.apply("c", report())
    st.on_view(["a", "b"], 3, left={"d"})
    assert "c" not in st._reports
    assert not st.apply("c", report())  # a late report of a member that is gone is not taken
    event = st.snapshot([info("a"), info("b")], epoch=3, state="member")["events"][0]
    assert event["failed"] == ["c"] and event["left"] == ["d"] and event["members"] == ["a", "b"]


def test_reports_faster_than_a_quarter_second_and_malformed_ones_are_counted() -> None:
    clock = Clock()
    st = RingStatus("a", clock=clock)
    assert st.apply("b", report())
    assert not st.apply("b", report())
    clock.t += 0.3
    assert not st.apply("b", {"v": 1, "st": ["not", "a", "state"]})
    assert st.stats == {"reports": 1, "malformed": 1, "too_fast": 1}


def test_a_recovery_is_an_event_and_the_pipeline_busy_share_is_this_members() -> None:
    st = RingStatus("b", clock=Clock())
    job = dataclasses.replace(JOB, strategy="pipeline")
    st.on_step(step(9, busy=[0.9, 0.4, 0.7]), job=job, members=["a", "b", "c"])
    st.on_step(step(10, epoch=2, busy=[0.9, 0.5]), job=job, members=["a", "b"])
    assert st.local.busy == 0.5 and st.local.members == ("a", "b")
    rec = [e for e in st.snapshot([], epoch=2, state="member")["events"] if e["kind"] == "recovery"]
    assert rec == [{"kind": "recovery", "t": rec[0]["t"], "step": 10, "epoch": 2, "members": ["a", "b"]}]


def test_the_timeline_shows_each_members_recent_ops_before_the_latest_end() -> None:
    st = RingStatus("a", clock=Clock())
    job = dataclasses.replace(JOB, strategy="pipeline")
    st.on_step(step(1), job=job, members=["a", "b"])
    st.set_timeline([(0, 0, 100.0, 100.02), (1, 0, 100.03, 100.05), (0, 0, 90.0, 90.01)])  # the last is old
    st.apply("b", report(job=job, members=("a", "b"), ops=((0, 0, 100.02, 100.04),), step_s=0.1))
    tl = st.snapshot([info("a"), info("b")], epoch=1, state="member")["timeline"]
    assert [lane["id"] for lane in tl["lanes"]] == ["a", "b"]
    # The window ends where b's report ends (its ops are older than a's latest); the op of 10 s ago is out.
    assert tl["lanes"][0]["ops"] == [[0, 0, -0.04, -0.02], [1, 0, -0.01, 0.01]]
    assert tl["lanes"][1]["ops"] == [[0, 0, -0.02, 0.0]]


def test_the_loss_curve_is_bounded() -> None:
    st = RingStatus("a", history=50, clock=Clock())
    for i in range(200):
        st.on_step(step(i, 3.0 - i / 100), job=JOB, members=["a"])
    series = st.snapshot([info("a")], epoch=1, state="member")["series"]
    assert len(series) == 50 and series[-1][0] == 199


# --- guards ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [
    ("8080", ("127.0.0.1", 8080)), ("0", ("127.0.0.1", 0)), ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9", ("::1", 9)), ("localhost:7", ("127.0.0.1", 7)),
])
def test_addresses(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "http", "host.lan:80", "127.0.0.1:99999", "1.2.3.4:-1", "::1:80:x"])
def test_bad_addresses_say_which_forms_work(text: str) -> None:
    with pytest.raises(ConfigError, match=r"\[ADDR:\]PORT"):
        parse_address(text)


def test_the_token_is_derived_from_the_secret_and_does_not_reveal_it() -> None:
    secret = b"s" * 32
    token = dashboard_token(secret)
    assert len(token) == 64 and secret.decode() not in token and token != dashboard_token(b"t" * 32)
    assert token_matches(token, token) and not token_matches(token[:-1] + "0", token) and not token_matches(None, token)


def test_the_host_check_stops_dns_rebinding() -> None:
    assert all(host_allowed(h) for h in ["127.0.0.1:8080", "localhost:1", "[::1]:80", "10.0.0.5"])
    assert not any(host_allowed(h) for h in [None, "", "evil.example:8080", "127.0.0.1.nip.io", "x" * 400])


def test_the_rate_limit_refills_per_client() -> None:
    clock = Clock()
    rl = RateLimiter(rate=10, burst=3, max_clients=4, clock=clock)
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b")
    clock.t += 0.15  # 1.5 tokens back
    assert rl.allow("a") and not rl.allow("a")
    for i in range(10):  # many clients: the table stays bounded
        rl.allow(f"c{i}")
    assert len(rl._buckets) <= 5


def test_a_page_off_loopback_needs_the_secret_before_anything_starts() -> None:
    args = argparse.Namespace(dashboard="0.0.0.0:8080", tensorboard=None)
    with pytest.raises(ConfigError, match="not loopback: that needs the cluster secret"):
        check_arguments(args, None)
    check_arguments(args, b"k" * 16)
    check_arguments(argparse.Namespace(dashboard="127.0.0.1:0", tensorboard=None), None)


def test_missing_extras_name_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("aiohttp", "tensorboardX") else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'p2ptrain\[dashboard\]'"):
        check_arguments(argparse.Namespace(dashboard="8080", tensorboard=None), None)
    with pytest.raises(ConfigError, match=r"pip install 'p2ptrain\[tensorboard\]'"):
        check_arguments(argparse.Namespace(dashboard=None, tensorboard="tb"), None)


def test_the_package_exports_exactly_its_public_names() -> None:
    mod = importlib.import_module("p2ptrain.dashboard")
    public = {k for k in dir(mod) if not k.startswith("_") and k != "annotations"
              and not isinstance(getattr(mod, k), types.ModuleType)}
    assert set(mod.__all__) == public
    import p2ptrain

    assert p2ptrain.Dashboard is mod.Dashboard
