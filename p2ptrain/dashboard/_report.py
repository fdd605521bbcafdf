"""The ``dash.status`` report: what one member tells the dashboards of the others.

Plain msgpack data, nothing pickled or evaluated. A member sends its report at most
once a second, and only to members that asked for it (``dash.want``, see
:mod:`p2ptrain.dashboard._share`). The sender keeps it under :data:`MAX_REPORT_BYTES`;
the receiver checks every field (type, range, length) and drops a report that breaks
any rule whole: :meth:`Report.from_wire` raises :class:`~p2ptrain.ProtocolError`.

Keys are short (the report travels every second): ``st`` state, ``pw`` power class,
``job`` the job, ``jm`` the job's members, ``ep`` its view epoch, ``s`` step, ``l`` loss,
``sps`` samples/s, ``ss`` step seconds, ``cs`` compute seconds, ``b`` busy share, ``j``
joules of the step, ``jt`` joules since the job started, ``m`` measured, ``ls`` recent
``[step, loss, samples/s]``, ``p`` the pipeline plan, ``ops`` recent pipeline ops,
``t`` the sender's wall clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2ptrain._errors import ProtocolError

__all__ = ["MAX_REPORT_BYTES", "JobInfo", "PlanInfo", "Report", "packed_size"]

VERSION = 1
#: Largest packed report accepted or sent: a 16-stage plan, 32 loss points and 96 ops
#: take ~4 KiB, so 8 KiB leaves room without letting a member flood the others.
MAX_REPORT_BYTES = 8 * 1024
MAX_LOSSES = 32  # recent points: a dashboard started mid-job back-fills its curve from them
MAX_OPS = 96  # recent pipeline ops (forward/backward/optimizer) for the timeline: ~2 KiB
MAX_STAGES = 32
MAX_MEMBERS = 64
MAX_ID = 128
MAX_TEXT = 200
STATES = ("alone", "member", "paused")
_MAX_COUNT = 10**12  # steps, batch sizes: far beyond any real job, still exact in a double


def _fail(what: str, value: Any) -> ProtocolError:
    return ProtocolError(f"bad dashboard report: {what} = {str(value)[:60]!r}")


def _int(v: Any, what: str, lo: int = 0, hi: int = _MAX_COUNT) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(what, v)
    return v


def _maybe(v: Any, what: str, lo: float = 0.0, hi: float = 1e12) -> float | None:
    """A float in ``[lo, hi]``, or None for nil or NaN (a diverged loss is shown as missing, not refused)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(what, v)
    v = float(v)
    if math.isnan(v):
        return None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise _fail(what, v)
    return v


def _float(v: Any, what: str, lo: float = 0.0, hi: float = 1e12) -> float:
    out = _maybe(v, what, lo, hi)
    if out is None:
        raise _fail(what, v)
    return out


def _text(d: Mapping[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > limit:
        raise _fail(key, v)
    return v


def _ids(v: Any, what: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or len(v) > MAX_MEMBERS or not all(isinstance(x, str) and 0 < len(x) <= MAX_ID for x in v):
        raise _fail(what, v)
    return tuple(v)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class JobInfo:
    """The job a member runs, as the page shows it."""

    id: str
    model: str
    strategy: str
    steps: int
    global_batch: int
    codec: str = "none"
    schedule: str = ""

    @classmethod
    def from_spec(cls, job_id: str, spec: Mapping[str, Any]) -> JobInfo:
        """From a job id and a ``JobSpec.to_wire()`` map (this member's own, cut to the report's bounds)."""
        def num(key: str) -> int:
            v = spec.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_COUNT else 0

        return cls(id=str(job_id)[:MAX_TEXT], model=str(spec.get("model", "?"))[:MAX_TEXT],
                   strategy=str(spec.get("strategy", "?"))[:16], steps=num("steps"), global_batch=num("global_batch"),
                   codec=str(spec.get("codec", "none"))[:32], schedule=str(spec.get("schedule", ""))[:16])

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "strategy": self.strategy, "steps": self.steps,
                "gb": self.global_batch, "codec": self.codec, "sched": self.schedule}

    @classmethod
    def from_wire(cls, d: Any) -> JobInfo:
        if not isinstance(d, dict):
            raise _fail("job", d)
        return cls(id=_text(d, "id"), model=_text(d, "model"), strategy=_text(d, "strategy", 16),
                   steps=_int(d.get("steps"), "steps"), global_batch=_int(d.get("gb"), "gb"), codec=_text(d, "codec", 32),
                   schedule=_text(d, "sched", 16))


@dataclass(frozen=True)
class PlanInfo:
    """A pipeline plan: per stage ``(members, shares, first layer, last layer)``, and its prediction."""

    stages: tuple[tuple[tuple[str, ...], tuple[int, ...], int, int], ...]
    micro_batches: int
    schedule: str
    step_s: float
    samples_per_s: float

    @classmethod
    def from_plan(cls, plan: Any) -> PlanInfo:
        """From a :class:`p2ptrain.plan.Plan` (duck-typed: ``stages``, ``micro_batches``, ...)."""
        stages = tuple((tuple(st.node_ids)[:MAX_MEMBERS], tuple(int(k) for k in st.shares)[:MAX_MEMBERS],
                        int(st.first_layer), int(st.last_layer)) for st in list(plan.stages)[:MAX_STAGES])
        return cls(stages, int(plan.micro_batches), str(plan.schedule)[:16], _finite(float(plan.step_s)) or 0.0,
                   _finite(float(plan.samples_per_s)) or 0.0)

    def to_wire(self) -> dict[str, Any]:
        return {"st": [[list(m), list(s), a, b] for m, s, a, b in self.stages], "mb": self.micro_batches,
                "sched": self.schedule, "ss": self.step_s, "sps": self.samples_per_s}

    @classmethod
    def from_wire(cls, d: Any) -> PlanInfo:
        if not isinstance(d, dict):
            raise _fail("plan", d)
        raw = d.get("st")
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_STAGES:
            raise _fail("plan stages", raw)
        stages = []
        for st in raw:
            if not isinstance(st, list) or len(st) != 4:
                raise _fail("plan stage", st)
            members, shares = _ids(st[0], "stage members"), st[1]
            if not isinstance(shares, list) or len(shares) != len(members) or not all(
                    isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= _MAX_COUNT for k in shares):
                raise _fail("stage shares", shares)
            first, last = _int(st[2], "first layer", 0, 1 << 20), _int(st[3], "last layer", 0, 1 << 20)
            stages.append((members, tuple(shares), first, last))
        return cls(tuple(stages), _int(d.get("mb"), "mb", 1, 1 << 20), _text(d, "sched", 16), _float(d.get("ss"), "ss"),
                   _float(d.get("sps"), "sps"))


@dataclass(frozen=True)
class Report:
    """One member's status. ``step == -1``: no step done yet (no job, or before its first step)."""

    state: str = "member"
    power: str = ""
    job: JobInfo | None = None
    members: tuple[str, ...] = ()
    epoch: int = 0
    step: int = -1
    loss: float | None = None
    samples_per_s: float = 0.0
    step_s: float = 0.0
    compute_s: float = 0.0
    busy: float | None = None
    joules: float | None = None
    joules_total: float = 0.0
    measured: bool = False
    losses: tuple[tuple[int, float | None, float], ...] = ()
    plan: PlanInfo | None = None
    ops: tuple[tuple[int, int, float, float], ...] = field(default=(), repr=False)
    sent_at: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        """The report as sent: short keys, plain msgpack values (missing floats as nil)."""
        out: dict[str, Any] = {"v": VERSION, "st": self.state, "pw": self.power, "t": self.sent_at, "s": self.step,
                               "ep": self.epoch, "jm": list(self.members), "l": _finite(self.loss),
                               "sps": self.samples_per_s, "ss": self.step_s, "cs": self.compute_s, "b": _finite(self.busy),
                               "j": _finite(self.joules), "jt": self.joules_total, "m": self.measured,
                               "ls": [[s, _finite(x), r] for s, x, r in self.losses[-MAX_LOSSES:]],
                               "ops": [list(op) for op in self.ops[-MAX_OPS:]]}
        out["job"] = self.job.to_wire() if self.job is not None else None
        out["p"] = self.plan.to_wire() if self.plan is not None else None
        return out

    @classmethod
    def from_wire(cls, meta: Any) -> Report:
        """Check and decode a report from the network.

        Raises:
            ProtocolError: wrong version, a missing or malformed field, a list too long,
                or more than :data:`MAX_REPORT_BYTES` packed.
        """
        if not isinstance(meta, dict) or meta.get("v") != VERSION:
            raise _fail("version", meta.get("v") if isinstance(meta, dict) else type(meta).__name__)
        size = packed_size(meta)
        if size > MAX_REPORT_BYTES:
            raise ProtocolError(f"bad dashboard report: {size} bytes packed, more than {MAX_REPORT_BYTES}")
        state = _text(meta, "st", 16)
        if state not in STATES:
            raise _fail("st", state)
        if not isinstance(meta.get("m"), bool):
            raise _fail("m", meta.get("m"))
        raw_losses = meta.get("ls")
        if not isinstance(raw_losses, list) or len(raw_losses) > MAX_LOSSES:
            raise _fail("ls", raw_losses)
        losses = []
        for p in raw_losses:
            if not isinstance(p, list) or len(p) != 3:
                raise _fail("ls point", p)
            losses.append((_int(p[0], "ls step"), _maybe(p[1], "ls loss", -1e12, 1e12), _float(p[2], "ls samples/s")))
        raw_ops = meta.get("ops")
        if not isinstance(raw_ops, list) or len(raw_ops) > MAX_OPS:
            raise _fail("ops", raw_ops)
        ops = []
        for op in raw_ops:
            if not isinstance(op, list) or len(op) != 4:
                raise _fail("op", op)
            t0, t1 = _float(op[2], "op start", 0.0, 1e11), _float(op[3], "op end", 0.0, 1e11)
            if t1 < t0:
                raise _fail("op times", op)
            ops.append((_int(op[0], "op kind", 0, 2), _int(op[1], "op micro-batch", -1, 1 << 20), t0, t1))
        job = None if meta.get("job") is None else JobInfo.from_wire(meta.get("job"))
        plan = None if meta.get("p") is None else PlanInfo.from_wire(meta.get("p"))
        return cls(
            state=state, power=_text(meta, "pw", 40), job=job, members=_ids(meta.get("jm"), "jm"),
            epoch=_int(meta.get("ep"), "ep"), step=_int(meta.get("s"), "s", -1), loss=_maybe(meta.get("l"), "l", -1e12, 1e12),
            samples_per_s=_float(meta.get("sps"), "sps"), step_s=_float(meta.get("ss"), "ss"),
            compute_s=_float(meta.get("cs"), "cs"), busy=_maybe(meta.get("b"), "b", 0.0, 1.0),
            joules=_maybe(meta.get("j"), "j"), joules_total=_float(meta.get("jt"), "jt"), measured=meta["m"],
            losses=tuple(losses), plan=plan, ops=tuple(ops), sent_at=_float(meta.get("t"), "t", 0.0, 1e11),
        )

    def trimmed(self) -> Report:
        """This report cut to fit :data:`MAX_REPORT_BYTES`: the ops go first, then loss points, the plan, the members."""
        import dataclasses

        out = self
        for cut in ({"ops": out.ops[-24:]}, {"ops": ()}, {"losses": out.losses[-4:]}, {"plan": None}, {"members": ()}):
            if packed_size(out.to_wire()) <= MAX_REPORT_BYTES:
                break
            out = dataclasses.replace(out, **cut)
        return out


def packed_size(meta: Any) -> int:
    """Bytes of ``meta`` packed as msgpack (what a report costs on the wire)."""
    try:
        return len(msgpack.packb(meta, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"bad dashboard report: not plain msgpack data ({exc})") from exc

