"""Local resource probe: bounded time, sane values, battery from (fake) sysfs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from p2ptrain._errors import ConfigError
from p2ptrain.discovery import Resources, probe_resources
from p2ptrain.discovery._resources import read_battery


def test_probe_is_bounded_sane_and_cached() -> None:
    import numpy  # noqa: F401 - import cost is not the probe's

    start = time.perf_counter()
    first = probe_resources()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.6  # 0.1 s budget + one matmul; slack for a loaded shared 2-core host
    assert first.cores >= 1 and first.memory_bytes > 1 << 20 and first.gflops > 0
    assert first.accelerator in {"cpu", "cuda", "jetson"}
    start = time.perf_counter()
    assert probe_resources().gflops == first.gflops  # cached
    assert time.perf_counter() - start < 0.05
    assert probe_resources(measure=False).gflops == 0.0
    assert Resources.from_txt(first.to_txt()) == first


def _supply(root: Path, name: str, kind: str, capacity: str | None) -> None:
    d = root / name
    d.mkdir()
    (d / "type").write_text(kind + "\n")
    if capacity is not None:
        (d / "capacity").write_text(capacity + "\n")


def test_battery_from_sysfs(tmp_path: Path) -> None:
    assert read_battery(tmp_path / "missing") is None
    _supply(tmp_path, "AC", "Mains", None)
    assert read_battery(tmp_path) is None
    _supply(tmp_path, "BAT0", "Battery", "80")
    _supply(tmp_path, "BAT1", "Battery", "garbage")
    assert read_battery(tmp_path) == 0.8
    _supply(tmp_path, "BAT2", "Battery", "40")
    assert read_battery(tmp_path) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "kw",
    [{"cores": 0}, {"memory_bytes": -1}, {"accelerator": ""}, {"gflops": float("nan")}, {"battery": 2.0}],
)
def test_resources_validate(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"cores": 1, "memory_bytes": 1, "accelerator": "cpu", "gflops": 1.0} | kw
    with pytest.raises(ConfigError, match=next(iter(kw))):
        Resources(**args)  # type: ignore[arg-type]


def test_the_speed_probe_runs_on_one_blas_thread_and_restores_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    # A multithreaded matmul on a busy host waits for its slowest thread: the probe read
    # 2.3 GFLOP/s on a machine that does ~230 (found by a new-user walkthrough).
    import numpy as np
    from threadpoolctl import threadpool_info

    from p2ptrain.discovery import _resources

    def blas_threads() -> set[int]:
        return {int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    seen: list[set[int]] = []
    real = np.matmul

    def spy(*a: object, **k: object) -> object:
        seen.append(blas_threads())
        return real(*a, **k)

    monkeypatch.setattr(np, "matmul", spy)
    assert _resources._measured_gflops.__wrapped__() > 0  # uncached: run the probe itself
    assert seen and all(s == {1} for s in seen), seen
    assert blas_threads() == before


def test_a_capped_device_reports_its_share_of_a_core(monkeypatch: pytest.MonkeyPatch) -> None:
    # An eighth-core testbed device announced ~150 GFLOP/s, the same as a half-core one: the
    # quota was rounded up to a whole core (a five-device walkthrough), and a newcomer's speed
    # is estimated from these figures.
    from types import SimpleNamespace

    from p2ptrain.discovery import _resources

    clock = iter(i * 1e-3 for i in range(10_000))  # every reading 1 ms after the last: each matmul "takes" 1 ms
    monkeypatch.setattr(_resources, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(_resources, "affinity_cores", lambda: 2)

    def probe(quota: float | None) -> float:
        monkeypatch.setattr(_resources, "cpu_quota", lambda: quota)
        return float(_resources._measured_gflops.__wrapped__())

    whole = probe(None)
    assert whole == pytest.approx(2 * 2.0 * _resources._PROBE_N**3 / 1e-3 / 1e9, rel=1e-3)  # two cores' worth
    assert probe(0.125) == pytest.approx(whole / 16, rel=1e-2)
    assert probe(0.5) == pytest.approx(whole / 4, rel=1e-2)
    assert probe(3.0) == pytest.approx(whole, rel=1e-3)  # a quota above the affinity changes nothing
