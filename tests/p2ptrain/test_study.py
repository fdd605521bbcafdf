"""``p2ptrain study`` and what it stands on: emulated devices' power, the power class on the wire,
the study's rows from members' reports, and the command end to end on loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2ptrain._errors import ConfigError, ProtocolError
from p2ptrain.bench._study import ROWS, WARMUP, compare, shares_for, summarise
from p2ptrain.cli._study import format_table, write_study_png
from p2ptrain.discovery import Resources
from p2ptrain.energy import Emulation, EnergyMeter, get_profile
from p2ptrain.testbed._cgroup import CgroupLayout
from p2ptrain.testbed._plan import launch_argv, plan_testbed
from p2ptrain.testbed._profile import load_profile, parse_profile

REPO = Path(__file__).resolve().parents[2]


# -- emulated devices ---------------------------------------------------------------------


def test_emulation_reads_the_environment_strictly() -> None:
    assert Emulation.from_env({}) == Emulation()
    emu = Emulation.from_env({"P2PTRAIN_POWER_PROFILE": "orin-nano", "P2PTRAIN_EMULATED_CPUS": "0.5", "P2PTRAIN_BATTERY": "0.4"})
    assert emu == Emulation("orin-nano", 0.5, 0.4) and emu.emulated
    assert emu.cpu_scale(get_profile("orin-nano")) == pytest.approx(12.0)  # 6 cores on half a host core
    assert Emulation().cpu_scale(get_profile("orin-nano")) == 1.0
    for env, needle in (({"P2PTRAIN_POWER_PROFILE": "orin"}, "unknown power profile 'orin'"),
                        ({"P2PTRAIN_EMULATED_CPUS": "half"}, "P2PTRAIN_EMULATED_CPUS='half' is not a number"),
                        ({"P2PTRAIN_BATTERY": "60"}, r"P2PTRAIN_BATTERY='60' must be in \[0, 1\]")):
        with pytest.raises(ConfigError, match=needle):
            Emulation.from_env(env)


def test_an_emulated_device_draws_its_profiles_power_on_its_share(tmp_path: Path) -> None:
    """Busy on its 0.25-core quota, a 4-core Jetson Nano (10 W mode) draws its loaded 10 W; no host sensor is used."""
    (tmp_path / "sys/class/powercap/intel-rapl:0").mkdir(parents=True)  # a host sensor that must be ignored
    (tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj").write_text("1000\n")
    t, cpu = [0.0], [0.0]
    meter = EnergyMeter.open(root=tmp_path, clock=lambda: t[0],
                             emulation=Emulation("jetson-nano-10w", 0.25, None))
    meter._cpu = lambda: cpu[0]  # inject the clock the model charges
    meter.start()
    t[0], cpu[0] = 10.0, 2.5  # 10 s fully busy on a quarter core
    r = meter.read()
    assert r.kind == "estimated" and "the host's sensors do not measure this device" in r.note
    assert "emulated: 4 cores on 0.25 host cores" in r.source
    assert r.watts_avg == pytest.approx(get_profile("jetson-nano-10w").loaded_w)


def test_meter_takes_the_profile_the_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PTRAIN_POWER_PROFILE", "raspberry-pi-5")
    monkeypatch.delenv("P2PTRAIN_EMULATED_CPUS", raising=False)
    choice = EnergyMeter.open(use_sensors=False).profile
    assert choice.profile.name == "raspberry-pi-5" and not choice.guessed and "P2PTRAIN_POWER_PROFILE" in choice.reason


# -- the power class in mDNS TXT ------------------------------------------------------------


def test_power_class_and_battery_travel_in_txt() -> None:
    res = Resources(cores=4, memory_bytes=1 << 30, accelerator="cpu", gflops=10.0, battery=0.55, power="orin-nano")
    txt = res.to_txt()
    assert txt["pwr"] == "orin-nano" and txt["bat"] == "0.55"
    assert Resources.from_txt(txt) == res
    old = {k: v for k, v in txt.items() if k != "pwr"}  # a peer of an earlier version: no class
    assert Resources.from_txt(old).power is None
    with pytest.raises(ProtocolError, match="power class"):
        Resources.from_txt({**txt, "pwr": "Orin Nano!"})
    with pytest.raises(ConfigError, match="power class"):
        Resources(cores=1, memory_bytes=1, accelerator="cpu", gflops=0.0, power="x" * 25)


def test_a_node_announces_its_power_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from p2ptrain.ring._local import local_resources

    monkeypatch.setenv("P2PTRAIN_POWER_PROFILE", "jetson-nano-5w")
    monkeypatch.setenv("P2PTRAIN_BATTERY", "0.15")
    res = local_resources()
    assert res.power == "jetson-nano-5w" and res.battery == 0.15


# -- testbed profiles with power -------------------------------------------------------------


def test_edge4_devices_carry_power_profiles_and_a_battery() -> None:
    specs = load_profile("edge4").for_devices(4)
    assert [s.power for s in specs] == ["laptop", "orin-nano", "raspberry-pi-5", "jetson-nano-10w"]
    assert [s.battery for s in specs] == [0.6, None, None, None]
    for s in specs:
        get_profile(s.power or "")


@pytest.mark.parametrize(("text", "needle"), [
    ('[[device]]\npower = "jetson"\n', r"device\[0\].power: unknown power profile 'jetson'"),
    ("[[device]]\npower = 5\n", "give a power profile's name"),
    ("[[device]]\nbattery = 1.5\n", r"battery is 1.5; it must lie in \[0, 1\]"),
])
def test_bad_power_fields_are_named(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_profile(text)


def test_the_launcher_tells_the_device_what_it_emulates() -> None:
    profile = parse_profile('[[device]]\npower = "orin-nano"\nbattery = 0.3\n[[device]]\n')
    plan = plan_testbed(profile, 2, layout=CgroupLayout(cpu=None, memory=None), name="e1")
    argv = launch_argv(plan.devices[0], ["python", "-c", "pass"])
    i = argv.index("env")
    assert argv[i:i + 4] == ["env", "P2PTRAIN_BATTERY=0.3", f"P2PTRAIN_EMULATED_CPUS={float(os.cpu_count() or 1)!r}",
                             "P2PTRAIN_POWER_PROFILE=orin-nano"]
    assert argv[i + 4:] == ["python", "-c", "pass"]
    assert "env" not in launch_argv(plan.devices[1], ["true"])  # nothing capped, no power profile: nothing said
    capped = dataclasses.replace(plan.devices[1], cpus=0.25)
    assert capped.env == {"P2PTRAIN_EMULATED_CPUS": "0.25"}  # the share, which the device's cgroup files cannot tell


def test_a_testbed_devices_share_counts_where_its_cgroup_is_out_of_sight(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ip netns exec`` hides the device's cgroup: before, every device read 'uncapped', shared one
    profile-cache key and planned with one device's speed for all."""
    from p2ptrain import discovery
    from p2ptrain.energy import EMULATED_CPUS_ENV
    from p2ptrain.plan import device_fingerprint

    assert discovery._resources.EMULATED_CPUS_ENV == EMULATED_CPUS_ENV
    monkeypatch.setattr(discovery._resources, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.setenv(EMULATED_CPUS_ENV, "0.3")
    assert discovery.cpu_quota() == 0.3 and device_fingerprint().endswith("quota0.300")
    monkeypatch.setenv(EMULATED_CPUS_ENV, "0.1")
    assert device_fingerprint().endswith("quota0.100")
    monkeypatch.setenv(EMULATED_CPUS_ENV, "lots")
    assert discovery.cpu_quota() is None


# -- rows from reports ------------------------------------------------------------------------


def _report(node: str, *, t0: float, step_s: float, joules: list[float], sent_per_step: int, n: int = 8,
            plan: dict | None = None) -> dict:
    steps = [[t0 + k * step_s, sent_per_step * k, 3.0 - 0.1 * k, joules, [False] * len(joules)] for k in range(n)]
    out = {"node": node, "ok": True, "steps": steps, "members": ["dev0", "dev1"], "peak_rss": 500 << 20,
           "energy_source": "model:profile:laptop; cpu=os.times", "start_s": 1.5}
    if plan:
        out["plan"] = plan
    return out


def test_summarise_counts_only_the_devices_the_plan_uses() -> None:
    plan = {"summary": "[[['dev0'], [32], 0, 5]]", "members": ["dev0"], "step_s": 0.1, "samples_per_s": 320.0,
            "j_per_sample": 0.01, "joules": {"dev0": 0.32}, "objective": "energy"}
    lead = _report("dev0", t0=0.0, step_s=0.1, joules=[0.4, 0.1], sent_per_step=1000, plan=plan)
    other = _report("dev1", t0=0.0, step_s=0.1, joules=[0.4, 0.1], sent_per_step=1000)
    row = summarise(ROWS[-1], [lead, other], global_batch=32, memory_limits=[None, 600 << 20])
    timed = 8 - WARMUP - 1  # step gaps after warm-up
    assert row["samples_per_s"] == pytest.approx(320.0) and row["step_s"] == pytest.approx(0.1)
    assert row["j_per_sample"] == pytest.approx(0.4 * timed / (32 * timed))
    assert row["j_per_sample_ring"] == pytest.approx(0.5 / 32)
    assert row["wire_bytes_per_step"] == 1000  # both members' in+out counted each byte twice
    assert row["fits"] and row["energy_source"] == "estimated" and row["members_used"] == ["dev0"]
    assert row["predicted_j_per_sample"] == 0.01 and row["peak_mem_bytes"] == 500 << 20
    # a member over its memory limit does not fit; a dead member fails the row
    assert not summarise(ROWS[0], [lead, other], global_batch=32, memory_limits=[None, 100 << 20])["fits"]
    dead = summarise(ROWS[0], [lead, None], global_batch=32)
    assert not dead["fits"] and "dev1 died" in dead["error"] and dead["samples_per_s"] is None


def test_a_pipeline_rows_back_to_back_last_report_is_no_step() -> None:
    lead = _report("dev0", t0=0.0, step_s=0.1, joules=[0.4, 0.1], sent_per_step=1000)
    lead["steps"][-1][0] = lead["steps"][-2][0] + 0.001  # reported right after the one before
    other = _report("dev1", t0=0.0, step_s=0.1, joules=[0.4, 0.1], sent_per_step=1000)
    row = summarise(ROWS[-1], [lead, other], global_batch=32)  # the planner's row: a pipeline job
    assert row["step_s"] == pytest.approx(0.1) and row["mean_step_s"] == pytest.approx(0.1)
    data = summarise(ROWS[0], [lead, other], global_batch=32)  # a data-parallel member reports at once
    assert data["mean_step_s"] < 0.1
    # The planner's row is an auto job: when it chose tensor parallelism, it reported as one.
    lead["plan"] = {"summary": "tensor", "members": ["dev0", "dev1"], "step_s": 0.2, "samples_per_s": 160.0,
                    "j_per_sample": None, "joules": {}, "objective": "time",
                    "choice": [["pipeline", 150.0, None], ["tensor", 160.0, None]]}
    split = summarise(ROWS[-1], [lead, other], global_batch=32)
    assert split["auto_options"] == [["pipeline", 150.0, None], ["tensor", 160.0, None]]
    assert split["mean_step_s"] < 0.1 and split["plan"] == "tensor" and split["members_used"] == ["dev0", "dev1"]
    assert split["predicted_samples_per_s"] == 160.0 and split["predicted_j_per_sample"] is None


def test_compare_and_the_table() -> None:
    rows = [{"strategy": "planner", "objective": "time", "j_per_sample": 0.1, "step_s": 0.1, "samples_per_s": 320.0,
             "fits": True, "energy_source": "estimated", "peak_mem_bytes": 1 << 29, "wire_bytes_per_step": 2048},
            {"strategy": "planner", "objective": "energy", "j_per_sample": 0.07, "step_s": 0.11, "samples_per_s": 290.0,
             "predicted_j_per_sample": 0.075, "fits": True, "energy_source": "estimated", "peak_mem_bytes": 1 << 29,
             "wire_bytes_per_step": 0, "plan": "[[['dev0'], [32], 0, 5]]"}]
    cmp = compare(rows)
    assert cmp["energy_vs_time"] == {"j_ratio": 0.7, "step_ratio": 1.1}
    assert cmp["energy_prediction"] == {"predicted_j_per_sample": 0.075, "metered_j_per_sample": 0.07, "ratio": 0.933}
    text = format_table({"rows": rows, "where": "loopback", **cmp})
    assert "0.70 x the joules per sample at 1.10 x the step time" in text and "predicted 75.00 mJ/sample" in text
    assert compare(rows[:1]) == {"energy_vs_time": None, "energy_prediction": None}
    failed = {"strategy": "data", "objective": "time", "fits": True, "error": "JobError: a sample each at least"}
    line = format_table({"rows": [failed], "where": "loopback"}).splitlines()[1]
    assert line.split()[9] == "-" and "JobError" in line  # failed: whether it fits is unknown
    assert shares_for([0.8, 0.4]) == (0.8, 0.4) and shares_for([0.8, None]) == ()


def test_png_is_written(tmp_path: Path) -> None:
    study = {"rows": [{"strategy": "data", "objective": "time", "samples_per_s": 100.0, "members_used": ["dev0", "dev1"],
                       "j_per_sample_by_device": {"dev0": 0.01, "dev1": 0.02}}],
             "devices": [{"name": "dev0"}, {"name": "dev1"}], "model": "tinygpt", "global_batch": 32, "where": "loopback"}
    write_study_png(tmp_path / "s.png", study)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A name without .png once printed "picture: NAME" while matplotlib wrote NAME.png.
    write_study_png(tmp_path / "bare", study)
    assert (tmp_path / "bare").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "bare.png").exists()


def test_bad_flags_fail_before_anything_starts() -> None:
    for argv, needle in ((["--only", "ring"], "--only 'ring' is not a row"), (["--max-slowdown", "0.5"], "at least 1.0"),
                         # docs/study.md once showed this keyword: it failed in every member, with tracebacks
                         (["--model-arg", "d_model=256"], "model_kwargs['d_model'] is not a parameter of zoo model"),
                         # a traceback after the study's minutes of measuring, or before them (a walkthrough)
                         (["--png", "README.md/x.png"], "--png README.md/x.png: cannot make its folder"),
                         (["--png", "docs"], "--png docs is a folder"),
                         # a third walkthrough: 0 ran 3 devices, 100 started 100 processes, nan killed every member,
                         # and an MLP's sequence row failed once its members had started
                         (["--peers", "0"], "--peers must be 1..16 on one machine, got 0"),
                         (["--peers", "100"], "--peers must be 1..16 on one machine, got 100"),
                         (["--max-slowdown", "nan"], "--max-slowdown must be a number of at least 1.0, got nan"),
                         (["--model", "mlp"], "the sequence and tensor row(s) cannot run this model: "),
                         (["--model", "mlp", "--only", "data", "--only", "sequence"], "(leave them out: --only data)")):
        proc = subprocess.run([sys.executable, "-m", "p2ptrain", "study", *argv], capture_output=True, text=True, timeout=60,
                              cwd=REPO)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_the_console_script_finds_a_model_module_in_the_current_folder(tmp_path: Path) -> None:
    # A walkthrough: `p2ptrain study --model mymod:cnn` beside mymod.py said "cannot import job entry
    # point 'mymod:cnn' on this node: No module named 'mymod'", where train and demo find it.
    script = Path(sys.executable).with_name("p2ptrain")
    assert script.exists(), f"no console script at {script}: the test command installs p2ptrain"
    (tmp_path / "p2pt_study_mod.py").write_text(
        "import p2ptrain\nfrom p2ptrain.zoo import mlp\n\n\n@p2ptrain.workload_entry\ndef make(seed=0):\n    return mlp(seed)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # An MLP has no sequence row: the refusal that follows the module's import, before anything starts.
    proc = subprocess.run([str(script), "study", "--model", "p2pt_study_mod:make", "--only", "data", "--only", "sequence"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "(leave them out: --only data)" in proc.stderr, proc.stderr
    proc = subprocess.run([str(script), "study", "--model", "p2pt_no_such_mod:make"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "run the study from the folder that holds p2pt_no_such_mod.py" in proc.stderr, proc.stderr


# -- end to end, on loopback ------------------------------------------------------------------


def test_study_runs_the_planner_rows_on_loopback(tmp_path: Path) -> None:
    """Two real member processes per row over loopback mDNS: both planner rows, JSON with the contract's keys."""
    png = tmp_path / "study.png"
    proc = subprocess.run(
        [sys.executable, "-m", "p2ptrain", "study", "--peers", "2", "--steps", "6", "--global-batch", "16",
         "--only", "data", "--only", "planner-time", "--only", "planner-energy", "--json", "--png", str(png)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads(proc.stdout)
    assert [(r["strategy"], r["objective"]) for r in study["rows"]] == [("data", "time"), ("planner", "time"), ("planner", "energy")]
    for r in study["rows"]:
        assert {"strategy", "objective", "samples_per_s", "j_per_sample", "energy_source", "peak_mem_bytes",
                "wire_bytes_per_step", "fits"} <= set(r)
        assert r["fits"] and r["samples_per_s"] > 0 and r["j_per_sample"] > 0 and r["energy_source"] == "estimated"
        assert r["peak_mem_bytes"] > 50 << 20
    assert study["rows"][0]["wire_bytes_per_step"] > 0  # data parallelism sums gradients every step
    assert set(study["energy_vs_time"]) == {"j_ratio", "step_ratio"}
    assert set(study["energy_prediction"]) >= {"predicted_j_per_sample", "metered_j_per_sample"}
    assert png.read_bytes()[:4] == b"\x89PNG"


# -- pricing data, sequence and tensor parallelism ------------------------------------------


def _priced_devices(n: int, *, link: float = 100e6 / 8):
    from p2ptrain.plan import Device, DevicePower

    return [Device(f"d{i}", 1.0 if i == 0 else 0.5, 1 << 32, link, fixed_s=0.01, hop_s=1e-3,
                   power=DevicePower(2.0, 4.0, 1e-8, 1e-5)) for i in range(n)]


def _costs():
    from p2ptrain.plan import LayerCost

    # embedding, four blocks of 64 tokens x 64 features (16 KiB a sample), head
    return ([LayerCost(1e-4, 2e-4, 4 << 16, 16 << 10)] + [LayerCost(5e-4, 1e-3, 200_000, 16 << 10)] * 4
            + [LayerCost(2e-4, 4e-4, 4 << 16, 1 << 10)])


def test_one_device_pays_compute_and_update_only() -> None:
    from p2ptrain.plan import price_strategy

    costs, dev = _costs(), _priced_devices(1)
    work = sum(c.fwd_s + c.bwd_s for c in costs)
    params = sum(c.param_bytes for c in costs)
    for strategy in ("data", "sequence", "tensor"):
        p = price_strategy(strategy, costs, dev, global_batch=32, update_s_per_byte=1e-9)
        assert p.step_s == pytest.approx(32 * work + 0.01 + 1e-9 * params)
        assert p.wire_bytes_per_step == 0
        assert p.joules["d0"] == pytest.approx(2.0 * p.step_s + 4.0 * p.step_s)  # busy the whole step
        assert p.j_per_sample == pytest.approx(p.joules["d0"] / 32)


def test_sequence_and_tensor_move_activations_every_block_and_rank_below_data_on_a_lan() -> None:
    from p2ptrain.plan import price_strategy

    costs, devs = _costs(), _priced_devices(3)
    data = price_strategy("data", costs, devs, global_batch=32)
    seq = price_strategy("sequence", costs, devs, global_batch=32, shares=(2, 1, 1))
    tp = price_strategy("tensor", costs, devs, global_batch=32, shares=(2, 1, 1))
    params = sum(c.param_bytes for c in costs)
    ring = 2 / 3
    assert data.wire_bytes_per_step == int(3 * 2 * ring * params)
    assert seq.wire_bytes_per_step == int(3 * (4 * 3 * ring * 2 * (16 << 10) * 32 + 2 * ring * params))
    assert tp.wire_bytes_per_step > data.wire_bytes_per_step and seq.wire_bytes_per_step > data.wire_bytes_per_step
    assert seq.step_s > data.step_s and tp.step_s > data.step_s  # 100 Mbit/s: communication-bound
    assert data.j_per_sample < seq.j_per_sample and data.j_per_sample < tp.j_per_sample
    # tensor parallelism holds a share of the blocks' parameters: less memory than a replica
    assert tp.memory_bytes["d1"] < data.memory_bytes["d1"]
    # uneven shares load the fast device more: with even ones the slow device is the bottleneck
    even = price_strategy("sequence", costs, devs, global_batch=32)
    assert seq.step_s < even.step_s
    tiny = _priced_devices(2)
    tiny = [type(d)(d.node_id, d.speed, 1 << 20, d.link_bytes_per_s) for d in tiny]
    assert not price_strategy("data", costs, tiny, global_batch=32).fits


@pytest.mark.parametrize(("kw", "needle"), [
    ({"strategy": "pipeline"}, "not one of data, sequence, tensor"),
    ({"shares": (1.0,)}, "must give each of the 2 devices"),
    ({"shares": (1.0, 0.0)}, "must give each of the 2 devices"),
])
def test_pricing_refuses_bad_arguments(kw: dict, needle: str) -> None:
    from p2ptrain.plan import price_strategy

    args = {"strategy": "sequence", **kw}
    with pytest.raises(ConfigError, match=needle):
        price_strategy(args.pop("strategy"), _costs(), _priced_devices(2), global_batch=32, **args)
