"""JobSpec on the wire (round trip, strict refusal), entry-point resolution, the reference run."""

from __future__ import annotations

import dataclasses
import pickle
import sys
import types
from typing import Any

import msgpack
import pytest
import torch
from torch import nn

from p2ptrain._errors import JobError
from p2ptrain.train._job import JobSpec, resolve, workload_entry
from p2ptrain.train._single import train_single
from p2ptrain.zoo import Workload, build


def wire(**changes: Any) -> dict[str, Any]:
    d = JobSpec().to_wire()
    d.update(changes)
    return d


def test_defaults_are_valid_and_round_trip_through_msgpack() -> None:
    spec = JobSpec(model="mlp", global_batch=64, codec="int8:128", model_kwargs={"hidden": 32, "depth": 1})
    packed = msgpack.packb(spec.to_wire())
    back = JobSpec.from_wire(msgpack.unpackb(packed))
    assert back == spec and back.digest() == spec.digest() and hash(back) == hash(spec)
    assert JobSpec.from_wire(JobSpec().to_wire()) == JobSpec()
    assert pickle.loads(pickle.dumps(spec)) == spec  # for specs handed to spawned processes


def test_digest_is_stable_and_canonical() -> None:
    a = JobSpec(model_kwargs={"n_layer": 2, "n_embd": 32})
    b = JobSpec(model_kwargs={"n_embd": 32, "n_layer": 2})
    assert a.digest() == b.digest() and len(a.digest()) == 16
    assert JobSpec(lr=3e-3).digest() == JobSpec(lr=0.003).digest()
    assert JobSpec(seed=1).digest() != JobSpec(seed=2).digest()
    assert JobSpec(lr=1).lr == 1.0 and isinstance(JobSpec(lr=1).lr, float)


def test_spec_is_immutable() -> None:
    spec = JobSpec(model_kwargs={"n_layer": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.steps = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.model_kwargs["n_layer"] = 3  # type: ignore[index]


HUGE = "x" * 1_000_000


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ([1, 2], "a job spec is a map, got list"),
        (wire(v=1), "wire version 1 is not 10"),
        ({k: v for k, v in wire().items() if k != "v"}, "wire version None"),
        ({k: v for k, v in wire().items() if k != "steps"}, "lacks field.*steps"),
        (wire(extra=1), "unknown job field 'extra'"),
        (wire(**{HUGE: 1}), r"unknown job field 'xxxx.*\(1000002 chars\)"),
        (wire(global_batch="32"), "'global_batch' = '32' is invalid: must be an integer, not str"),
        (wire(global_batch=32.0), "must be an integer, not float"),
        (wire(global_batch=True), "must be an integer, not bool"),
        (wire(global_batch=0), r"'global_batch' = 0 is invalid: use 1..65536"),
        (wire(global_batch=10**12), "'global_batch'.*use 1..65536"),
        (wire(steps=0), "'steps' = 0"),
        (wire(seed=-1), "'seed' = -1"),
        (wire(seed=1 << 64), "'seed'"),
        (wire(bucket_bytes=1), "'bucket_bytes' = 1 is invalid: use 4096.."),
        (wire(digest_every=-5), "'digest_every'"),
        (wire(micro_batches=64, global_batch=32), "cannot exceed global_batch=32"),
        (wire(schedule="zigzag"), "'schedule' = 'zigzag' is invalid: use 1f1b or gpipe"),
        (wire(schedule=1), "'schedule' = 1 is invalid: must be a string"),
        (wire(lr="0.1"), "'lr' = '0.1' is invalid: must be a number"),
        (wire(lr=float("nan")), "'lr' = nan"),
        (wire(lr=float("inf")), "'lr' = inf"),
        (wire(lr=0.0), r"'lr' = 0.0 is invalid: use a finite number in \(0, 10.0\]"),
        (wire(lr=-1e-3), "'lr'"),
        (wire(strategy="ring"), "'strategy' = 'ring' is invalid: use one of auto, data, pipeline, sequence, tensor"),
        (wire(strategy=None), "'strategy' = None is invalid: must be a string"),
        (wire(codec="gzip"), "'codec' = 'gzip' is invalid: use none, fp16, bf16"),
        (wire(codec="int8:abc"), "'codec'"),
        (wire(codec="int8:12345678"), "'codec'"),
        (wire(codec="topk:0.01;rm -rf"), "'codec'"),
        (wire(codec="INT8"), "'codec'"),
        (wire(model=HUGE), r"'model' = 'xxxx.*\(1000002 chars\) is invalid: is longer than 200"),
        (wire(model="resnet"), "name a zoo model \\(mlp, tinygpt\\), a 'module:function'"),
        (wire(model="tinyGPT"), "name a zoo model \\(mlp, tinygpt\\) \\(did you mean 'tinygpt'\\?\\), a 'module:function'"),
        (wire(model="os.system('x'):f"), "entry point reads 'package.module:function'"),
        (wire(model="a:b:c"), "entry point"),
        (wire(model="mod:"), "entry point"),
        (wire(model="módulo:f"), "entry point"),
        (wire(model=3), "'model' = 3 is invalid: must be a string"),
        (wire(model_kwargs=[1]), "'model_kwargs' = \\[1\\] is invalid: must be a map"),
        (wire(model_kwargs={str(i): 1 for i in range(33)}), "more than 32 entries"),
        (wire(model_kwargs={"a b": 1}), "keys are identifiers"),
        (wire(model_kwargs={"k" * 65: 1}), "keys are identifiers"),
        (wire(model_kwargs={1: 1}), "keys are identifiers"),
        (wire(model_kwargs={"seed": 1}), "the job's own 'seed' field"),
        (wire(model_kwargs={"n": [1, 2]}), r"job field model_kwargs\['n'\] = \[1, 2\] is invalid: values are int, float or str, not list"),
        (wire(model_kwargs={"n": {"x": 1}}), "not dict"),
        (wire(model_kwargs={"n": True}), "not bool"),
        (wire(model_kwargs={"n": None}), "not NoneType"),
        (wire(model_kwargs={"n": 1 << 70}), "fit in 64 bits"),
        (wire(model_kwargs={"n": float("inf")}), "finite"),
        (wire(model_kwargs={"n": "y" * 257}), "at most 256 characters"),
        # A zoo model's keywords are checked where the spec is written: `bench pipeline
        # --model-arg d_model=384` once failed two minutes later, in a member, as a traceback.
        (wire(model_kwargs={"d_model": 384}), r"model_kwargs\['d_model'\] is not a parameter of zoo model 'tinygpt'; it takes"),
        (wire(model_kwargs={"n_layer": "8"}), r"model_kwargs\['n_layer'\]='8' is a str; zoo model 'tinygpt' wants an int"),
    ],
)
def test_from_wire_refuses_malformed_specs(d: Any, message: str) -> None:
    with pytest.raises(JobError, match=message):
        JobSpec.from_wire(d)


def test_local_construction_is_checked_too() -> None:
    with pytest.raises(JobError, match="'global_batch' = 0"):
        JobSpec(global_batch=0)
    with pytest.raises(JobError, match="'lr' = 1000.*finite number"):
        JobSpec(lr=10**400)


# --------------------------------------------------------------------------------
# resolve


@pytest.fixture
def entry_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A user module importable on 'every member' (here: this process's sys.modules)."""
    mod = types.ModuleType("p2ptrain_test_entry")

    @workload_entry
    def tiny(seed: int, width: int = 3) -> Workload:
        return build("mlp", seed, hidden=width, n_samples=64)

    @workload_entry
    def broken(seed: int) -> Workload:
        raise RuntimeError("no camera attached")

    @workload_entry
    def not_a_workload(seed: int) -> Any:
        return nn.Linear(1, 1)

    def unmarked(seed: int) -> Workload:
        return build("mlp", seed)

    @workload_entry
    def anything(seed: int, **kwargs: Any) -> Workload:  # takes any keyword: its own checks decide
        raise RuntimeError(f"got {', '.join(kwargs)}")

    mod.tiny, mod.broken, mod.not_a_workload, mod.unmarked = tiny, broken, not_a_workload, unmarked
    @workload_entry
    def sized(seed: int, width: int = 3) -> Workload:  # hands its keyword to torch as it is
        torch.nn.Linear(width, 2)
        return build("mlp", seed)

    mod.anything, mod.sized = anything, sized
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def test_resolve_builds_zoo_models_with_the_job_seed() -> None:
    w = resolve(JobSpec(model="mlp", seed=4, model_kwargs={"hidden": 8}))
    ref = build("mlp", 4, hidden=8)
    assert all(torch.equal(a, b) for a, b in zip(w.model.parameters(), ref.model.parameters()))


def test_resolve_imports_a_marked_entry_point(entry_module: types.ModuleType) -> None:
    w = resolve(JobSpec(model="p2ptrain_test_entry:tiny", seed=1, model_kwargs={"width": 5}))
    assert w.model[0].out_features == 5


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        (
            "p2ptrain_no_such_module:make",
            {},
            "cannot import job entry point 'p2ptrain_no_such_module:make' on this node: "
            "ModuleNotFoundError: No module named 'p2ptrain_no_such_module'",
        ),
        ("p2ptrain_test_entry:nope", {}, "cannot import .*AttributeError: .*'nope'"),
        ("p2ptrain_test_entry:unmarked", {}, "not marked as one; decorate .* @p2ptrain.workload_entry"),
        ("os:system", {}, "not marked"),
        ("p2ptrain_test_entry:broken", {}, "failed to build its workload: RuntimeError: no camera attached"),
        # A keyword the function does not take names the ones it does (it was Python's TypeError).
        ("p2ptrain_test_entry:tiny", {"depth": 2},
         r"model_kwargs\['depth'\] is not a parameter of job entry point 'p2ptrain_test_entry:tiny'; it takes width$"),
        ("p2ptrain_test_entry:tiny", {"widht": 2}, r"\(did you mean 'width'\?\); it takes width$"),
        ("p2ptrain_test_entry:broken", {"x": 1}, "is not a parameter of .*; it takes no keywords$"),
        ("p2ptrain_test_entry:anything", {"x": 1}, "failed to build its workload: RuntimeError: got x"),
        # A value of the wrong type fails inside the user's code: the error names what it was called with.
        ("p2ptrain_test_entry:sized", {"width": 3.5}, r"failed to build its workload: TypeError: .* \(called with "
                                                      r"width=3.5 \(float\); --model-arg values are read as an int, "
                                                      r"else a float, else a string\)$"),
        ("p2ptrain_test_entry:not_a_workload", {}, "returned a Linear; it must return a p2ptrain Workload"),
        # A host script's f"{__name__}:policy" reached the members as '__main__:policy' (a walkthrough).
        ("__main__:policy", {}, r"AttributeError: .*\('__main__' is each process's own script, here '.*': put the function "
                                r"in a module every member imports, e.g. policy.py, and start each member with --allow-entry"),
    ],
)
def test_resolve_failures_say_why(entry_module: types.ModuleType, model: str, kwargs: dict, message: str) -> None:
    with pytest.raises(JobError, match=message):
        resolve(JobSpec(model=model, model_kwargs=kwargs))


def test_resolve_passes_zoo_errors_through() -> None:
    with pytest.raises(JobError, match="not a parameter of zoo model 'mlp'"):
        resolve(JobSpec(model="mlp", model_kwargs={"width": 3}))


# --------------------------------------------------------------------------------
# the single-process reference


def test_train_single_is_deterministic() -> None:
    spec = JobSpec(model="mlp", global_batch=16, seed=3, lr=1e-2, model_kwargs={"n_samples": 256})
    m1, l1 = train_single(spec, 5)
    m2, l2 = train_single(spec, 5)
    assert l1 == l2 and len(l1) == 5
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_tinygpt_learns_in_30_steps() -> None:
    spec = JobSpec(
        model="tinygpt",
        global_batch=16,
        steps=30,
        lr=1e-2,
        model_kwargs={"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 32},
    )
    _, losses = train_single(spec)
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # From ~ln(vocab) = 4.6 to below 3.4: it has learned at least the character frequencies.
    assert first > 4.2 and last < first - 0.8, losses
