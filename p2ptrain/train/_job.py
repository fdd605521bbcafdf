"""The job: what the ring trains, how it is described on the wire, and the reference run.

A :class:`JobSpec` is small, plain data. One member submits it; every member checks
it with :meth:`JobSpec.from_wire` (it came from the network, so every field is
type-, range- and length-checked before use), then builds the same
:class:`~p2ptrain.zoo.Workload` locally with :func:`resolve`. Code never travels:
``model`` names a zoo entry, a ``module:function`` importable on every member (the
way ``torchrun`` names a script that must exist on every host), or ``hf:<path>``, a
Hugging Face model directory that every member holds at that path.
:func:`~p2ptrain.train.train_single` (``_single.py``) is the reference every strategy matches.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, TypeVar

from p2ptrain._errors import JobError
from p2ptrain.train._stale import stale
from p2ptrain.zoo import HF_PREFIX, ZOO, Workload, build, check_entry_keywords, check_kwargs, did_you_mean, hf_workload

# Gradient bytes per all-reduce bucket, for every strategy's gradient sum (a pipeline stage
# group's too). Small buckets start summing while backward still runs, but each costs
# 2 (n - 1) messages on every member: a 15 M-parameter model's 60 MB in 1 MiB buckets took
# 4x as long to sum as in one all-reduce (`bench allreduce --bucket`), and its
# data-parallel step took 1.65 s against 1.46 s with 4 MiB (docs/performance.md).
# tinygpt's 0.9 MB of fp32 gradients is one bucket either way.
DEFAULT_BUCKET_BYTES = 4 << 20

__all__ = ["JobSpec", "parse_model_args", "resolve", "submitter_of", "workload_entry"]

# Each release refuses the one before, whose members would fail mid-job. 7: a planned job's probe
# turns gather (probing, host, CPU demand, cores) and ping a partner with the prober in the tag.
# 8: a pipeline step's closing sum carries every member's compute seconds (1 + 4n entries).
# 9: the together pass gathers (solo pass, host, CPU demand, cores), then whether each member
# remembers its share. 10: the closing sum carries every member's step seconds too (1 + 5n).
WIRE_VERSION = 10

STRATEGIES = ("auto", "data", "pipeline", "sequence", "tensor")
# The strategies whose members measure and agree on a plan (auto weighs sequence and
# tensor parallelism beside it: p2ptrain.plan._auto).
PLANNED = ("pipeline", "auto")
MAX_SHARES = 1024
# The codec registry lives in p2ptrain.kernels; the spec checks the syntax only, so a
# job names a codec the same way on a node whose kernels know more codecs.
_CODEC_RE = re.compile(r"^(none|fp16|bf16|int8(:\d{1,7})?|topk(:[0-9.eE-]{1,12})?)$")
_ZOO_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# ASCII identifiers only (``\w`` would admit any Unicode letter).
_ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_KWARG_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

MAX_MODEL_LEN = 200
MAX_KWARGS = 32
MAX_KWARG_STR = 256
_INT64_MAX = (1 << 63) - 1

# Inclusive ranges of the integer fields. Bounds are far beyond any sane job; they
# exist so a corrupt or hostile spec cannot ask a member for absurd allocations.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "global_batch": (1, 1 << 16),
    "steps": (1, 10**9),
    "seed": (0, _INT64_MAX),
    "micro_batches": (0, 1024),
    "bucket_bytes": (4096, 1 << 30),
    "digest_every": (0, 10**9),
    "checkpoint_every": (0, 10**9),
    "replica_every": (0, 10**9),
}
# Fields that do not change what the job computes: a checkpoint of one lineage serves a
# job that differs in them only (e.g. a resumed job that runs longer).
# Shares only say who computes what: a sequence job's checkpoint is a whole replica (tensor
# jobs write none), so a resume with other shares, or an auto job's speed shares, finds it.
_NOT_LINEAGE = ("steps", "digest_every", "checkpoint_every", "replica_every", "resume", "admit", "submitter_trains",
                "objective", "max_slowdown", "max_j_per_sample", "shares")
_LR_MAX = 10.0

Kwarg = int | float | str


def _show(value: Any) -> str:
    """repr of a value for an error message, cut so a huge string stays readable."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} chars)"


def _bad(name: str, value: Any, fix: str) -> JobError:
    label = f"'{name}'" if name.isidentifier() else name  # model_kwargs['n'] reads as is
    return JobError(f"job field {label} = {_show(value)} is invalid: {fix}")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What the ring trains. Every field is checked on construction.

    Attributes:
        model: a zoo name (``"tinygpt"``, ``"mlp"``), ``"module:function"``
            importable on every member (the function is called as
            ``function(seed=seed, **model_kwargs)`` and returns a ``Workload``; it
            must be marked with :func:`workload_entry`), or ``"hf:<path>"``: a Hugging
            Face model directory every member holds at ``path`` (absolute, or relative
            to each member's working directory; see :func:`p2ptrain.zoo.hf_causal_lm`).
        strategy: ``"data"`` (replicas, gradient all-reduce), ``"pipeline"`` (planned
            stages), ``"sequence"`` (every member holds the model and a slice of every
            sequence), ``"tensor"`` (every member holds a share of each block's heads
            and MLP columns) or ``"auto"`` (the planner's pipeline/hybrid plan, or
            sequence or tensor parallelism where it predicts them better for the
            objective; :mod:`p2ptrain.plan._auto`).
        global_batch: samples per step across the whole ring.
        steps: optimizer steps to run.
        seed: seeds the parameters and the data order.
        lr: learning rate handed to the workload's ``make_optimizer``.
        codec: gradient codec spec, e.g. ``"none"``, ``"int8:128"``, ``"topk:0.01"``.
        micro_batches: micro-batches per step (pipeline and auto); 0 lets the planner choose.
        schedule: pipeline schedule, ``"1f1b"`` (bounded activations) or ``"gpipe"``.
        bucket_bytes: gradient bytes per all-reduce bucket.
        digest_every: steps between parameter-digest checks across members; 0: never.
        model_kwargs: keyword arguments for the model's factory (str to int/float/str).
        checkpoint_every: every member writes its part of the state to its checkpoint
            directory every this many steps (0: never); see :mod:`p2ptrain.train._store`.
        replica_every: pipeline jobs: each stage sends a copy of its state to another
            member every this many steps, so the job survives losing the stage's
            member (0: never; then only stages held by several members survive).
        resume: go on from the latest checkpoint the members hold together (every
            member needs a checkpoint directory, or refuses the job); none held: the job
            starts at step 0; some layers of a step but no step whole: a JobError.
        admit: members that join the ring during the job are brought into it at the
            next step boundary (False: the job goes on with the members it had).
        objective: what a pipeline or auto job's planner optimises: ``"time"`` (the
            fastest plan) or ``"energy"`` (the fewest joules per sample; see
            :mod:`p2ptrain.plan._energy`).
        max_slowdown: with ``objective="energy"``, no plan slower than this times the
            fastest plan (0: no bound; e.g. 1.2).
        max_j_per_sample: with ``objective="time"``, no plan predicted to cost more
            joules per sample (0: no bound; every member needs power figures, which
            its energy meter gives).
        shares: the sequence and tensor strategies: each member's relative share of the
            work, in ring order (uneven shares for unequal devices); empty: even shares.
        submitter_trains: False keeps the submitting member out of the plan: it only
            offers the job, follows its progress and receives the trained model
            (pipeline and auto only; ``p2ptrain train --submit-only``).

    Raises:
        JobError: a field is out of range or malformed; the message names it.
    """

    # The zoo's character-level GPT: the workload the demo shows.
    model: str = "tinygpt"
    # Data parallelism needs no planner and every member holds the whole model.
    strategy: str = "data"
    # 32 windows of 64 chars: 60-90 ms of compute per step for tinygpt on a 2-core CPU,
    # and a multiple of 1, 2, 4, 8 and 16 members, so the demo's rings split it evenly.
    global_batch: int = 32
    # Enough for tinygpt's loss to fall from ln(vocab) ~ 4.6 to ~2.5: a visible demo.
    steps: int = 200
    # Any fixed value: a job is reproducible unless its submitter asks otherwise.
    seed: int = 0
    # Adam-family rate for tiny transformers (nanoGPT's baby char model uses 1e-3 at
    # 10M params; 0.2M params tolerate and need more).
    lr: float = 3e-3
    # Uncompressed: exact transparency with the single-process reference.
    codec: str = "none"
    # One micro-batch: plain data parallelism; the pipeline strategy raises it.
    micro_batches: int = 1
    # 1F1B bounds each stage's in-flight activations; every member must run the same
    # schedule (a 1F1B stage next to a GPipe one deadlocks), so it travels in the spec.
    schedule: str = "1f1b"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    # Hashing the parameters costs a pass over them; every 50 steps (a few seconds of
    # tinygpt) still catches a diverged replica (a nondeterministic kernel, a lost
    # update) long before it wastes a run.
    digest_every: int = 50
    # Empty: the factory's own defaults (tinygpt 4x64, 4 heads, context 64).
    model_kwargs: Mapping[str, Kwarg] = field(default_factory=dict)
    # Off: writing to disk is the user's choice (where, and how often for their disk).
    checkpoint_every: int = 0
    # Every 10 steps: a stage's copy is one clone plus one message per 10 steps (well
    # under 5% of step time, docs/recovery.md), and a loss replays at most 10 steps.
    replica_every: int = 10
    resume: bool = False
    # On: a device that joins mid-job adds its compute; a job that must keep its exact
    # member set (a benchmark) turns it off.
    admit: bool = True
    # On: the member that offers a job is usually a device with compute to give.
    submitter_trains: bool = True
    # Time: what a user waiting for the result expects; energy is the robot-on-battery choice.
    objective: str = "time"
    # No bound: the energy objective alone decides (a user who minds the time sets 1.2).
    max_slowdown: float = 0.0
    # No budget: a user who pays per joule sets one (J/sample, as the plan table shows it).
    max_j_per_sample: float = 0.0
    # Empty: equal shares, the right split for equal devices and the only one that
    # needs no measurement.
    shares: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()
        # Immutable and in a canonical order, so digest() and equality do not depend
        # on how the caller built the dict.
        kwargs = MappingProxyType({k: self.model_kwargs[k] for k in sorted(self.model_kwargs)})
        object.__setattr__(self, "model_kwargs", kwargs)

    def __hash__(self) -> int:
        return hash(self.digest())

    def __reduce__(self) -> tuple[Any, ...]:
        # model_kwargs is a mappingproxy, which pickle refuses; go through the wire form
        # (so a spec handed to a spawned test process is re-validated, too).
        return (JobSpec.from_wire, (self.to_wire(),))

    def _check_types(self) -> None:
        for name in ("model", "strategy", "codec", "schedule", "objective"):
            value = getattr(self, name)
            if type(value) is not str:
                raise _bad(name, value, f"must be a string, not {type(value).__name__}")
        for name in _INT_RANGES:
            value = getattr(self, name)
            if type(value) is not int:  # bool is an int subclass; refuse it too
                raise _bad(name, value, f"must be an integer, not {type(value).__name__}")
        for name in ("resume", "admit", "submitter_trains"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise _bad(name, value, f"must be true or false, not {type(value).__name__}")
        for name in ("max_slowdown", "max_j_per_sample"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not -1e300 < value < 1e300:
                raise _bad(name, value, "must be a finite number (0: no bound)")
            object.__setattr__(self, name, float(value))
        if type(self.lr) not in (int, float):
            raise _bad("lr", self.lr, f"must be a number, not {type(self.lr).__name__}")
        try:
            object.__setattr__(self, "lr", float(self.lr))
        except OverflowError:  # an int beyond float range
            raise _bad("lr", self.lr, f"use a finite number in (0, {_LR_MAX}]") from None
        if not isinstance(self.shares, (tuple, list)) or any(type(x) not in (int, float) or not -1e300 < x < 1e300
                                                             for x in self.shares):  # NaN, inf, huge ints fail
            raise _bad("shares", self.shares, "must be a list of finite numbers, one per member")
        object.__setattr__(self, "shares", tuple(float(x) for x in self.shares))
        if not isinstance(self.model_kwargs, Mapping):
            raise _bad(
                "model_kwargs", self.model_kwargs, f"must be a mapping, not {type(self.model_kwargs).__name__}"
            )

    def _check_values(self) -> None:
        if len(self.model) > MAX_MODEL_LEN:
            raise _bad("model", self.model, f"is longer than {MAX_MODEL_LEN} characters")
        if self.model.startswith(HF_PREFIX):
            path = self.model[len(HF_PREFIX) :]
            # isprintable() is False for NUL, newlines and other control characters.
            if not path or not path.isprintable() or path != path.strip():
                raise _bad("model", self.model, "'hf:' is followed by a directory path: printable, no surrounding spaces")
        elif ":" in self.model:
            if not _ENTRY_RE.match(self.model):
                raise _bad("model", self.model, "an entry point reads 'package.module:function' (ASCII identifiers)")
        elif not _ZOO_NAME_RE.match(self.model) or self.model not in ZOO:
            raise _bad("model", self.model, f"name a zoo model ({', '.join(sorted(ZOO))}){did_you_mean(self.model, ZOO)}, "
                       "a 'module:function' entry point, or 'hf:<directory>'")
        if self.strategy not in STRATEGIES:
            raise _bad("strategy", self.strategy, f"use one of {', '.join(STRATEGIES)}")
        if not self.submitter_trains and self.strategy not in PLANNED:
            raise _bad("submitter_trains", False, "a member may stay out of the plan (`--submit-only`) only with the "
                                                  "pipeline or auto strategy (the others train on every member)")
        if len(self.shares) > MAX_SHARES or any(not (math.isfinite(x) and x > 0) for x in self.shares):
            raise _bad("shares", list(self.shares), f"use at most {MAX_SHARES} finite positive numbers, one per member")
        if self.shares and self.strategy not in ("sequence", "tensor"):
            raise _bad("shares", list(self.shares), "shares split the sequence and tensor strategies only")
        if self.objective not in ("time", "energy"):
            raise _bad("objective", self.objective, "use time or energy")
        if not (self.max_slowdown == 0 or 1.0 <= self.max_slowdown <= 1000.0):
            raise _bad("max_slowdown", self.max_slowdown, "use 0 (no bound) or a factor in 1..1000, e.g. 1.2")
        if not 0.0 <= self.max_j_per_sample <= 1e6:
            raise _bad("max_j_per_sample", self.max_j_per_sample, "use 0 (no bound) or a positive budget, e.g. 0.05")
        for bound, goes_with, other in (("max_slowdown", "energy", "max_j_per_sample"), ("max_j_per_sample", "time", "max_slowdown")):
            if getattr(self, bound) and self.objective != goes_with:  # max_slowdown on a time job did nothing, silently
                raise _bad(bound, getattr(self, bound), f"bounds the {goes_with} objective; with objective="
                                                        f"'{self.objective}' bound the {goes_with} with {other}")
        planner = [(n, getattr(self, n)) for n in ("objective", "max_slowdown", "max_j_per_sample") if getattr(self, n) not in ("time", 0)]
        if planner and self.strategy not in PLANNED:
            raise _bad(*planner[0], "the planner (its objective and budgets) serves the pipeline and auto strategies; "
                                    "use strategy='auto' or 'pipeline'")
        if self.strategy == "auto" and self.resume:
            raise _bad("resume", True, "a checkpoint holds the strategy it was written with (the job's manifest and "
                                       "its log name it); resume with that strategy, not 'auto'")
        if self.schedule not in ("1f1b", "gpipe"):
            raise _bad("schedule", self.schedule, "use 1f1b or gpipe")
        if not _CODEC_RE.match(self.codec):
            raise _bad("codec", self.codec, "use none, fp16, bf16, int8[:block] or topk[:fraction]")
        for name, (lo, hi) in _INT_RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise _bad(name, value, f"use {lo}..{hi}")
        if not (math.isfinite(self.lr) and 0.0 < self.lr <= _LR_MAX):
            raise _bad("lr", self.lr, f"use a finite number in (0, {_LR_MAX}]")
        if self.micro_batches > self.global_batch:
            raise _bad("micro_batches", self.micro_batches, f"cannot exceed global_batch={self.global_batch}")
        if len(self.model_kwargs) > MAX_KWARGS:
            raise _bad("model_kwargs", dict(self.model_kwargs), f"holds more than {MAX_KWARGS} entries")
        for key, value in self.model_kwargs.items():
            if type(key) is not str or not _KWARG_KEY_RE.match(key):
                raise _bad("model_kwargs", key, "keys are identifiers of at most 64 ASCII characters")
            if key == "seed":
                raise _bad("model_kwargs", key, "the seed is the job's own 'seed' field; set that instead")
            where = f"model_kwargs[{key!r}]"
            if type(value) is int:
                if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
                    raise _bad(where, value, "integers must fit in 64 bits")
            elif type(value) is float:
                if not math.isfinite(value):
                    raise _bad(where, value, "floats must be finite")
            elif type(value) is str:
                if len(value) > MAX_KWARG_STR:
                    raise _bad(where, value, f"strings hold at most {MAX_KWARG_STR} characters")
            else:
                raise _bad(where, value, f"values are int, float or str, not {type(value).__name__}")
        if (factory := ZOO.get(self.model)) is not None:  # a keyword's typo fails where the spec is written
            check_kwargs(f"zoo model {self.model!r}", factory, self.model_kwargs)

    def to_wire(self) -> dict[str, Any]:
        """The spec as plain msgpack/JSON-able data (read back by :meth:`from_wire`)."""
        wire: dict[str, Any] = {"v": WIRE_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            wire[f.name] = dict(value) if f.name == "model_kwargs" else list(value) if f.name == "shares" else value
        return wire

    @classmethod
    def from_wire(cls, d: Any) -> JobSpec:
        """Check and decode a spec that came from the network.

        The dict must hold exactly the fields :meth:`to_wire` writes: a missing field
        could silently take a default that differs between versions, and an unknown
        one could carry meaning this node would ignore.

        Raises:
            JobError: anything malformed; the message names the field and the fix.
        """
        if not isinstance(d, dict):
            raise JobError(f"a job spec is a map, got {type(d).__name__}")
        version = d.get("v")
        if type(version) is not int or version != WIRE_VERSION:
            raise JobError(
                f"job spec wire version {_show(version)} is not {WIRE_VERSION}; "
                "run the same p2ptrain release on every member"
            )
        names = {f.name for f in fields(cls)}
        for key in d:
            if key != "v" and key not in names:
                raise JobError(
                    f"unknown job field {_show(key)}; this node's job spec (wire version "
                    f"{WIRE_VERSION}) has {', '.join(sorted(names))}"
                )
        missing = sorted(names - d.keys())
        if missing:
            raise JobError(f"job spec lacks field(s) {', '.join(missing)}")
        kwargs = d["model_kwargs"]
        if not isinstance(kwargs, dict):
            raise _bad("model_kwargs", kwargs, f"must be a map, not {type(kwargs).__name__}")
        # Construction runs every type, range and length check in __post_init__.
        return cls(**{name: d[name] for name in names})

    def to_wire_fields(self) -> dict[str, Any]:
        """The fields as keyword arguments (``JobSpec(**{**spec.to_wire_fields(), "steps": 20})`` derives a spec)."""
        return {k: v for k, v in self.to_wire().items() if k != "v"}

    def lineage(self) -> str:
        """The digest of what the job computes (not how long or how often it saves): names its checkpoints."""
        wire = {k: v for k, v in self.to_wire().items() if k not in _NOT_LINEAGE}
        text = json.dumps(wire, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def digest(self) -> str:
        """A stable 16-hex-digit hash of the spec; members compare it to agree on the job."""
        text = json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_model_args(items: list[str]) -> dict[str, int | float | str]:
    """``["depth=4", "lr_scale=0.5", "name=x"]`` -> ``{"depth": 4, "lr_scale": 0.5, "name": "x"}``.

    Raises:
        JobError: an item is not ``K=V`` or names a key twice.
    """
    out: dict[str, int | float | str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise JobError(f"--model-arg {item!r} is not K=V (e.g. --model-arg depth=4)")
        if key in out:
            raise JobError(f"--model-arg names {key!r} twice")
        value: int | float | str
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
                if not math.isfinite(value):
                    value = text  # "nan", "inf": a word, not a number
            except ValueError:
                value = text
        out[key] = value
    return out


_ENTRY_MARK = "__p2ptrain_workload_entry__"

F = TypeVar("F", bound=Callable[..., Workload])


def workload_entry(fn: F) -> F:
    """Mark ``fn`` as a job entry point that :func:`resolve` may call.

    A job names its entry point over the network, so without the mark any member
    could have every other member call any importable function (``shutil:rmtree``)
    with keyword arguments of its choosing. The mark limits that to functions their
    authors meant for it.

    Example::

        @p2ptrain.workload_entry
        def my_robot_policy(seed: int, hidden: int = 128) -> p2ptrain.Workload: ...
    """
    setattr(fn, _ENTRY_MARK, True)
    return fn


def submitter_of(job_id: str) -> str:
    """The node id of the member that submitted ``job_id`` (a job id starts with it, then ``/``)."""
    return job_id.split("/", 1)[0]


def resolve(spec: JobSpec, *, allowed_modules: Collection[str] | None = None) -> Workload:
    """Build the spec's workload on this node: from the zoo, its entry point or its Hugging Face directory.

    Importing a module runs its top-level code, so a job from the network may only name a module
    this node allows: one in ``allowed_modules`` (``p2ptrain join --allow-entry MODULE``) or one
    already imported by the host; ``None`` allows any (local use: the caller wrote the spec).

    Likewise an ``"hf:<path>"`` model directory and its ``data`` file must lie inside a directory
    named in ``allowed_modules`` (``--allow-entry /srv/models``: an entry holding a ``/`` that
    names an existing directory; symbolic links are resolved first); ``None`` allows any path.

    An entry point ``"module:function"`` is imported with :func:`importlib.import_module`;
    the function must carry the :func:`workload_entry` mark, and is called as
    ``function(seed=spec.seed, **spec.model_kwargs)``.

    Raises:
        JobError: the name is unknown, the import or the call fails (with the underlying error),
            the function is unmarked, returns no ``Workload``, or its module's file changed
            since a job imported it here (:func:`p2ptrain.train._stale.stale`).
    """
    if spec.model.startswith(HF_PREFIX):
        return hf_workload(spec.model[len(HF_PREFIX) :], spec.seed, spec.model_kwargs, allowed=allowed_modules)
    if ":" not in spec.model:
        return build(spec.model, spec.seed, **spec.model_kwargs)
    module_name, func_name = spec.model.split(":")
    if allowed_modules is not None and module_name not in allowed_modules and module_name not in sys.modules:
        raise JobError(
            f"job entry point {spec.model!r} names module {module_name!r}, which this node does not allow; "
            f"start the node with --allow-entry {module_name} to accept it"
        )
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, func_name)
    except Exception as exc:  # any import-time failure: the submitter needs the reason
        # A host script's own function (f"{__name__}:f" run as a script) is no other process's.
        hint = "" if module_name != "__main__" else (f" ('__main__' is each process's own script, here {sys.argv[0]!r}: put "
                                                     "the function in a module every member imports, e.g. policy.py, and "
                                                     "start each member with --allow-entry policy)")
        raise JobError(f"cannot import job entry point {spec.model!r} on this node: {type(exc).__name__}: {exc}{hint}") from exc
    if (why := stale(module)) is not None:  # edited since an earlier job imported it here (a walkthrough)
        raise JobError(f"job entry point {spec.model!r}: {why}")
    if not callable(factory) or getattr(factory, _ENTRY_MARK, False) is not True:
        raise JobError(
            f"job entry point {spec.model!r} is not marked as one; decorate the function "
            "with @p2ptrain.workload_entry (only marked functions can be named by a job)"
        )
    check_entry_keywords(f"job entry point {spec.model!r}", factory, spec.model_kwargs)
    try:
        workload = factory(seed=spec.seed, **spec.model_kwargs)
    except JobError:
        raise
    except Exception as exc:
        # A walkthrough: --model-arg hidden=3.5 gave torch's "empty(): argument 'size' ..." alone. --data is no --model-arg.
        given = ", ".join(f"{k}={v!r} ({type(v).__name__})" for k, v in spec.model_kwargs.items())
        typed = "; --model-arg values are read as an int, else a float, else a string" if set(spec.model_kwargs) - {"data"} else ""
        args = f" (called with {given}{typed})" if given else ""
        raise JobError(f"job entry point {spec.model!r} failed to build its workload: {type(exc).__name__}: {exc}{args}") from exc
    if not isinstance(workload, Workload):
        raise JobError(f"job entry point {spec.model!r} returned a {type(workload).__name__}; it must return a p2ptrain Workload")
    return workload
