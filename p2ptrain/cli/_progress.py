"""The console's progress line and ``metrics.jsonl`` of a run (``demo`` and ``train``).

``_Metrics`` holds the records until the first step, so a run that never trains writes
nothing; ``_Progress`` turns each step's metrics into the line a user reads and the
records a tool reads (the fields are listed in :mod:`p2ptrain.cli._demo`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["_Metrics", "_Progress", "_steps_run"]


class _Metrics:
    """``metrics.jsonl``, created at the first step: records before it wait in memory."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.perf_counter) -> None:
        self.path, self.clock = path, clock
        self.t0 = clock()
        self.pending: list[dict[str, Any]] = []
        self.file: IO[str] | None = None

    def write(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "t": round(self.clock() - self.t0, 4), **fields}
        if self.file is None and event != "step":
            self.pending.append(rec)
            return
        if self.file is None:
            self.file = open(self.path, "w")
            for r in self.pending:
                self.file.write(json.dumps(r) + "\n")
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def amend(self, event: str, **fields: Any) -> None:
        """Set ``fields`` in the first record of ``event`` that still waits to be written."""
        for rec in self.pending:
            if rec["event"] == event:
                rec.update(fields)
                return

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Progress:
    """One updating line on a terminal (a line every 10 steps otherwise), and the step records.

    The rates are the ring's: a step's time is the wall time since this member's
    previous step (or since the plan, for the first), which includes waiting for the
    others. This member's own step time is not the ring's: a member the planner leaves
    out trains nothing and would show an absurd rate.

    Args:
        me: this member's id.
        pipeline: a pipeline job (every member's busy share comes with each step).
        members_of: the job's members (ids, ring order) at the current step.
        ring_of: the ring's members now (who a plan leaves out); ``members_of`` without it.
        at_step: called with each step's metrics first (the fault injector).
        clock: seconds, monotonic (a test passes a fake one).
    """

    def __init__(self, total: int, global_batch: int, out: IO[str], metrics: _Metrics, *, me: str, pipeline: bool,
                 members_of: Callable[[], list[str]], at_step: Callable[[Any], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, ring_of: Callable[[], list[str]] | None = None) -> None:
        self.total, self.global_batch, self.out, self.metrics = total, global_batch, out, metrics
        self.me, self.pipeline, self.members_of, self.at_step, self.clock = me, pipeline, members_of, at_step, clock
        self.ring_of = ring_of
        self.events: list[int] = []  # steps where the ring changed
        self.epoch: int | None = None
        self.members_then: list[str] | None = None  # the job's members at the step before
        self.last_step: int | None = None
        self.recent: list[float] = []  # the latest steps' times, the first step's left out
        self.tty = out.isatty()
        self.last_t: float | None = None
        self.first_t: float | None = None  # when the first step was reported
        self.steps_seen = 0
        self.train_s = 0.0  # summed step times (the ring's)
        self.losses: dict[int, float] = {}  # step -> loss, for a run stopped before its result
        self.expected: list[str] | None = None  # the members a data job's split was shown for

    def _started(self, members: list[str]) -> None:
        """The first step: the run record names who trained it, and a change since the split shown is said.

        The run record and a data job's split are written when the ring forms; a member
        lost (or come) before the job's first step left both naming the ring of then.
        """
        self.metrics.amend("run", members=members)
        if self.expected is None or set(members) == set(self.expected):
            return
        gone = [m for m in self.expected if m not in members]
        came = [m for m in members if m not in self.expected]
        what = "; ".join(part for part in (f"{', '.join(gone)} left before it began" if gone else "",
                                           f"{', '.join(came)} came in" if came else "") if part)
        print(f"the job started on {len(members)} member(s), not the {len(self.expected)} above: {what}",
              file=self.out, flush=True)

    def start(self) -> None:
        """The job's plan is agreed: the first step's time counts from here."""
        if self.last_t is None:
            self.last_t = self.clock()

    def plan(self, plan: Any) -> None:
        """``on_plan``: show the plan, log it, and start the clock (the first plan only)."""
        print(plan.table(), file=self.out, flush=True)
        # The table names only who trains. The ring now, not the job's members: an admission's
        # plan comes before the trainer takes its new view (it named a member just lost).
        ring = self.ring_of() if self.ring_of is not None else self.members_of()
        if out := [m for m in ring if m not in plan.members]:
            print(f"left out of the plan: {', '.join(f'{m} (this member)' if m == self.me else m for m in out)}",
                  file=self.out, flush=True)
        self.metrics.write(
            "plan", micro_batches=plan.micro_batches, micro_batch_size=plan.micro_batch_size, schedule=plan.schedule,
            predicted_step_s=round(plan.step_s, 6), predicted_samples_per_s=round(plan.samples_per_s, 2),
            stages=[{"members": list(st.node_ids), "shares": list(st.shares), "layers": [st.first_layer, st.last_layer]}
                    for st in plan.stages],
            objective=plan.objective, predicted_joules={n: round(j, 6) for n, j in plan.joules},
        )
        self.start()

    def choice(self, choice: Any) -> None:
        """``on_choice``: an auto job's weighed options; the clock starts here unless a plan follows."""
        print(choice.table(), flush=True)
        self.pipeline = choice.strategy == "pipeline"  # the progress line shows stages only for a pipeline
        self.metrics.write("strategy", chosen=choice.strategy, shares=list(choice.shares),
                           options=[{"strategy": n, "predicted_samples_per_s": round(sps, 2),
                                     "predicted_j_per_sample": round(j, 6) if j == j else None}
                                    for n, sps, j in choice.options], left_out=dict(choice.skipped))
        if choice.strategy != "pipeline":
            shares = ", ".join(f"{s:g}" for s in choice.shares)
            print(f"plan: {choice.strategy} parallel over {len(choice.shares)} members; shares: {shares}", flush=True)
            self.start()

    def rate(self) -> float:
        """Samples per second of the ring while training: wall time between the first and last steps.

        The first step's own time is left out when there are more (it includes setting
        the stages up after the plan).
        """
        if self.steps_seen >= 2 and self.first_t is not None and self.last_t is not None and self.last_t > self.first_t:
            return self.global_batch * (self.steps_seen - 1) / (self.last_t - self.first_t)
        return self.global_batch * self.steps_seen / self.train_s if self.train_s > 0 else 0.0

    def __call__(self, m: Any) -> None:
        if self.at_step is not None:
            self.at_step(m)
        now = self.clock()
        step_s = max(m.step_s, now - self.last_t) if self.last_t is not None else m.step_s
        if self.recent and step_s < 0.1 * statistics.median(self.recent):
            step_s = statistics.median(self.recent)  # reported back to back (settled at a ring change): time unknown
        elif self.steps_seen:  # not the first step: that one includes the set-up after the plan
            self.recent = [*self.recent[-7:], step_s]
        self.last_t = now
        if self.first_t is None:
            self.first_t = now
        self.steps_seen += 1
        self.train_s += step_s
        self.losses[m.step] = m.loss
        members = self.members_of()
        if self.steps_seen == 1:
            self._started(members)
        if self.epoch is not None and m.epoch != self.epoch:
            self.events.append(m.step)
            # Who went and who came (a walkthrough's kill -9 was named nowhere in the output).
            then = self.members_then or members
            gone, came = [x for x in then if x not in members], [x for x in members if x not in then]
            self.metrics.write("ring_change", step=m.step, from_epoch=self.epoch, to_epoch=m.epoch, members=members,
                               gone=gone, came=came)
            if self.tty:
                self.out.write("\n")
            who = "".join(f"; {', '.join(ids)} {what}" for ids, what in ((gone, "gone"), (came, "came in")) if ids)
            print(f"ring changed (view {self.epoch} -> {m.epoch}, {len(members)} member(s) now{who}): "
                  f"training goes on from step {m.step + 1}", file=self.out, flush=True)
        self.epoch, self.members_then = m.epoch, members
        if self.last_step is not None and m.step > self.last_step + 1:  # applied, but its loss went with a ring change
            for lost in range(self.last_step + 1, m.step):
                self.metrics.write("step_lost", step=lost, epoch=m.epoch)
        elif self.last_step is not None and m.step <= self.last_step:  # a recovery went back to a copy: replayed
            # A walkthrough's metrics.jsonl went 45 -> 40 with no word: steps 40-45 twice, read as unique.
            self.metrics.write("rolled_back", step=m.step, last=self.last_step, epoch=m.epoch)
        self.last_step = m.step
        rate = self.global_batch / step_s if step_s > 0 else 0.0
        if self.pipeline and len(m.busy) == len(members):  # every member's busy share, ring order
            busy = dict(zip(members, m.busy))
            # Each share after its member's id's last 4 characters (the plan table names them in full).
            shown = "busy " + " ".join(f"{n[-4:]} {100 * b:.0f}%" for n, b in zip(members, m.busy))
        else:  # data parallel: this member's own
            mine = m.compute_s / m.step_s if m.step_s else 0.0
            busy = {self.me: round(mine, 4)}
            shown = f"busy {100 * mine:3.0f}% (this member)"
        self.metrics.write(
            "step", step=m.step, loss=m.loss, samples_per_s=round(rate, 2), step_s=round(step_s, 6),
            member_step_s=round(m.step_s, 6), compute_s=round(m.compute_s, 6), comm_wait_s=round(m.comm_wait_s, 6),
            members=members, stages=m.members if self.pipeline else 1, epoch=m.epoch, busy=busy,
            **({"joules": dict(zip(members, m.joules)), "joules_measured": dict(zip(members, m.measured))}
               if len(m.joules) == len(members) else {}),
        )
        done = m.step + 1
        width = 30
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        joules = sum(m.joules)
        energy = (f"  {joules:5.1f} J, {1e3 * joules / self.global_batch:.0f} mJ/sample "
                  f"({'measured' if all(m.measured) else 'est.'})" if m.joules else "")
        line = f"[{bar}] step {done}/{self.total}  loss {m.loss:.4f}  {rate:6.0f} samples/s  {shown}{energy}"
        if self.tty:
            self.out.write("\r" + line)
            if done == self.total:
                self.out.write("\n")
            self.out.flush()
        elif done % 10 == 0 or done == self.total or done == 1:
            print(line, file=self.out, flush=True)


def _steps_run(result: Any, resume: bool = False) -> str:
    """'60 steps', or 'steps 41..60 (resumed after 40 steps)' for a job that went on from a checkpoint.

    Counted from 1, as the progress bar counts them (a walkthrough read "step 60/60" on the
    bar and "steps 40..59" under it).

    A job asked to resume that found nothing to resume from says so here, in the line a
    user reads, not only in a member's log.
    """
    if not result.first_step:
        if resume:
            return f"{result.steps} steps from step 0 (resume asked, but no member held a checkpoint of this job)"
        return f"{result.steps} steps"
    return f"steps {result.first_step + 1}..{result.steps} (resumed after {result.first_step} steps)"
