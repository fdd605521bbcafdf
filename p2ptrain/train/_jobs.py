"""Leaderless jobs: any member offers a job to the ring; every member accepts or refuses.

Protocol (all messages carry the view epoch, so an offer made in an older view is dropped):

1. The submitter sends ``job.offer`` {id, job} to every other member of its view.
2. Each member (the submitter too) validates the spec and imports its entry point on its
   own thread, then sends ``job.ack`` {id, ok, error, data} to every other member.
3. Each member waits for the acks of all members. If all accepted and all hold the same
   data digest, every member starts training; otherwise every member raises the same
   :class:`JobError`, naming the member that refused and why — the submitter sees it.
   If the view changes meanwhile (a member died or froze while the others answered),
   nobody starts (:class:`~p2ptrain.train._serve.StartInterrupted`) and the submitter
   offers the job again to the new view, a few times at most (:data:`START_ATTEMPTS`).

The plan (ranks, shards, sample order) is a pure function of the agreed view and the job (pipeline
jobs add measurements all members exchange): nothing else is handed out.

4. A member whose training fails without leaving the ring sends ``job.abort`` {error}
   to the others, and each stops with a :class:`JobError` naming it. A member that
   leaves or dies changes the view, and with ``recover=True`` the job goes on with the
   survivors: a data-parallel job at once (:mod:`p2ptrain.train._recovery`), a pipeline or hybrid
   job re-planned on the survivors from the measurements it already has and rolled back to the
   latest step whose state they hold together (:mod:`p2ptrain.train.pipeline._keeper`).
5. After the last step of a pipeline job each stage's first member sends the submitter
   its layers (:mod:`p2ptrain.train._gather`): the submitter's result holds the whole model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Collection, Coroutine
from typing import Any

import torch

from p2ptrain._device import pick_device
from p2ptrain._errors import ConfigError, JobError, JobStopped, PeerFailedError
from p2ptrain.ring import Node, View, gather_within, send_or_fail
from p2ptrain.train._abort import guarded, stop_when_gone
from p2ptrain.train._admit import ADMIT, Admission, decide, reply
from p2ptrain.train._compute import compute_pool, warm_process
from p2ptrain.train._dataparallel import StepMetrics, TrainResult
from p2ptrain.train._energy import StepEnergy, busy_per_cpu_s, device_power, wire_bytes
from p2ptrain.train._gather import weights_back
from p2ptrain.train._job import PLANNED, JobSpec, resolve, submitter_of
from p2ptrain.train._replan import PlanInputs
from p2ptrain.train._serve import ACK, OFFER, VIEW_GRACE, NodeBusy, StartInterrupted, refuse, refusing, serve, until, view_after
from p2ptrain.train._store import Checkpoints
from p2ptrain.train._strategies import auto_choice, make_trainer, members_fit, offer_refusal, refusal
from p2ptrain.train.pipeline._layout import layout_from_plan, layout_from_wire, layout_to_wire
from p2ptrain.zoo import Workload

__all__ = ["JobService"]

logger = logging.getLogger(__name__)

ACK_TIMEOUT = 120.0
START_ATTEMPTS = 3  # offers of one submit() whose start a view change interrupted


class JobService(NodeBusy):
    """Runs jobs offered to ``node``'s ring, and offers jobs to it.

    Args:
        node: a started node.
        on_step: called with each step's metrics of jobs this node runs.
        on_applied: called with ``(step, view epoch)`` once a step's update is applied here (recovery benches).
        on_plan: called with the pipeline plan once the members agreed on it, and again after each re-plan.
        on_choice: called with an ``auto`` job's :class:`~p2ptrain.plan.StrategyChoice`
            (before ``on_plan``, which follows only when the plan was chosen).
        allow_entry: modules a job from the network may name as ``module:function``
            (zoo models and modules the host already imported are always allowed).
        split: ``"planned"`` (the planner's split), ``"pipeline"`` (a pure pipeline: one device per stage,
            all devices, planned cuts) or ``"even"`` (layers split evenly); the last two are baselines.
            Every member must use the same.
        recover: jobs go on with the survivors when a member fails or leaves; False stops them (PeerFailedError).
        checkpoint_dir: where this member writes its checkpoints (jobs with ``checkpoint_every``) and looks
            for them (jobs with ``resume``); a job that asks for either is refused by a member without one.
        admit: this member asks members that join the ring during a job into it (when the job's ``admit``
            field allows, :mod:`p2ptrain.train._admit`) and accepts such invitations; False opts out of both.
        device: where this member computes: ``"auto"`` (CUDA, else MPS, else CPU),
            ``"cpu"``, ``"cuda[:N]"`` or ``"mps"`` (:func:`p2ptrain._device.pick_device`).
        offload: keep a separate device copy even on the CPU (tests run a GPU member's code path with it).
    """

    def __init__(
        self,
        node: Node,
        *,
        on_step: Callable[[StepMetrics], Any] | None = None,
        on_applied: Callable[[int, int], Any] | None = None,
        on_plan: Callable[[Any], Any] | None = None,
        on_choice: Callable[[Any], Any] | None = None,
        allow_entry: Collection[str] = (),
        split: str = "planned",
        recover: bool = True,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        admit: bool = True,
        device: str | torch.device = "auto",
        offload: bool = False,
    ) -> None:
        self.device, self.offload = pick_device(device), offload
        if split not in ("planned", "pipeline", "even"):
            raise ConfigError(f"split must be 'planned', 'pipeline' or 'even', got {split!r}")
        self.split, self.recover, self.checkpoint_dir = split, recover, checkpoint_dir
        self.last_plan_inputs: Any = None
        self.last_plan_timings: dict[str, float] = {}  # the last agreement's phases (agree_on_plan's timings)
        self.node, self.allow_entry = node, frozenset(allow_entry)
        self.on_step, self.on_applied, self.on_plan, self.on_choice = on_step, on_applied, on_plan, on_choice
        self.last_choice: Any = None  # the StrategyChoice of the last job, when it was an auto job
        self.last_trainer: Any = None
        self.admit = admit
        self._energy_meter: Any = None  # opened on the first job (reads sysfs once)
        self._offers, self._admits = node.subscribe(OFFER), node.subscribe(ADMIT)
        self._training: asyncio.Future[TrainResult] | None = None
        self._stop: str | None = None  # stop()'s reason for the job being accepted or planned here
        self._warming: asyncio.Future[None] | None = None
        self.left_jobs: set[str] = set()  # jobs leave() took this member out of (their invitations are declined)

    async def warm_up(self) -> None:
        """Do this process's one-time training work now rather than when the first job arrives.

        The first optimizer a process builds imports ``torch._dynamo`` (and sympy): about
        1 s on a worker thread, but unmarshalling and running that much module code holds
        the GIL in stretches of up to 100-300 ms (measured, ``p2ptrain bench embed``), and
        no other thread of the process, the host's event loop included, runs meanwhile.
        A host with a control loop awaits this before arming it. Cheap once done; a job
        offered meanwhile waits for it.
        """
        if self._warming is None:
            self._warming = asyncio.ensure_future(self._warm())
        await asyncio.shield(self._warming)

    async def _warm(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, warm_process)
        await loop.run_in_executor(None, self._meter)  # reads sysfs once

    @property
    def running(self) -> bool:
        """A job trains (or is being planned) on this member now."""
        return self._training is not None and not self._training.done()

    async def leave(self, timeout: float = 60.0, *, step_out: bool = True) -> bool:
        """Stop this member's part of the running job at a step boundary, handing its state over.

        The other members then go on from the step this member stopped at, with no rollback; on the job's
        submitter, it stops the job everywhere instead (``submit`` raises JobStopped). With ``step_out`` the
        node, which stays open, steps out of the ring's view and back in (:meth:`Node.step_out`), so the others
        go on at once and later invitations into that job are declined; without it (``p2ptrain join`` on
        Ctrl-C) the caller closes the node next: a node that stays open then holds the job up. True when a
        job was running and stopped in order.
        """
        training, trainer = self._training, self.last_trainer
        if not self.running or training is None or trainer is None:
            return False
        if submitter_of(trainer.job or "") == self.node.node_id:  # only the submitter takes the model: the job ends
            self.stop("its submitter left the job")
        else:
            trainer.leave()
        # Not wait_for(shield(...)): a training task cancelled meanwhile (its node closing) would raise
        # CancelledError out of here, as if this call had been cancelled (a traceback on a join's Ctrl-C).
        await asyncio.wait([training], timeout=timeout)
        if not training.done():
            logger.warning("the job did not reach a step boundary within %.0fs; leaving anyway", timeout)
            return False
        if training.cancelled():
            return False
        exc = training.exception()  # the job's own outcome is reported where it runs
        if step_out and exc is None and getattr(trainer, "left_at", None) is not None and not self.node.closed:
            # It kept its node open (a host that still shows the ring): the others waited for a view
            # without it until the node closed, training nothing meanwhile (80 s in a walkthrough).
            self.left_jobs.add(trainer.job)
            self.node.step_out()
        return exc is None or isinstance(exc, JobStopped)

    def stop(self, reason: str) -> bool:
        """Stop the running job on every member at the next step boundary (each with :class:`~p2ptrain.JobStopped`,
        the others naming this member and ``reason``; a pipeline's at one step, at most two on, its model gathered on
        the submitter first, as after the last step); False: no job runs here."""
        if not self.running:
            return False
        self._stop = reason  # a trainer still being planned or built takes it when it is
        if self.last_trainer is not None:
            self.last_trainer.stop_reason = reason
        return True

    async def submit(self, spec: JobSpec) -> TrainResult:
        """Offer ``spec`` to every member of the current view and train it here too.

        Raises:
            JobError: a member refused the job (the message names it and says why).
            PeerFailedError: a member failed during the job.
        """
        self.check_free()  # a running node, not busy with another job
        for attempt in range(1, START_ATTEMPTS + 1):
            view = self.node.view
            job_id = f"{self.node.node_id}/{spec.digest()}/{secrets.token_hex(3)}"
            try:
                async with refusing(self, job_id):
                    await self._offer(job_id, spec, view)
                    return await self._accept_and_run(job_id, spec, view.epoch, own=True)
            except StartInterrupted as exc:
                if not self.recover or attempt == START_ATTEMPTS:
                    raise
                logger.warning("%s; offering it again (attempt %d of %d)", exc, attempt + 1, START_ATTEMPTS)
            await view_after(self.node, view)
        raise AssertionError("unreachable")

    async def _offer(self, job_id: str, spec: JobSpec, view: View) -> None:
        for m in view.members:
            if m != self.node.node_id:
                try:
                    await send_or_fail(self.node, m, OFFER, epoch=view.epoch, meta={"id": job_id, "job": spec.to_wire()},
                                       timeout=30)
                except PeerFailedError as exc:
                    raise StartInterrupted(f"job {job_id}: could not be offered to {m}: {exc}") from exc
        logger.info("offered job %s (%s, %s) to %d members", job_id, spec.model, spec.strategy, len(view))

    async def serve(self, *, once: bool = False) -> TrainResult | None:
        """Wait for offers, and invitations into running jobs, and run them (forever, or one job when ``once``).

        One job at a time: while this member is busy with one (:attr:`busy_with`), offers and invitations are
        refused at once, except an invitation into the job it runs and another offer from the same submitter,
        which wait behind it (docs/recovery.md); one still waiting when ``once`` returns is kept for the next
        call. A failed job is logged and serving goes on; with ``once`` its error is raised. Returns None once
        the node closes.
        """
        return await serve(self, once)

    async def _join_running(self, msg: Any) -> TrainResult | None:
        """Answer an invitation into a running job; if taken, train it from the members' state."""
        meta = msg.meta if isinstance(msg.meta, dict) else {}
        job_id = meta.get("id")
        if not isinstance(job_id, str) or len(job_id) > 200 or msg.epoch != self.node.view.epoch:
            return None
        if isinstance(closed := meta.get("closed"), str):  # a job that takes nobody mid-job: said, not waited out
            logger.warning("job %s runs without this member: %s; this member waits for the next job", job_id,
                           closed[:500])
            return None
        if job_id in self.left_jobs:  # leave() took this member out of it: it does not come back by itself
            await reply(self.node, msg.sender, msg.epoch, job_id, False, f"{self.node.node_id} left this job", "")
            return None
        if self.running:
            # Still in a job (the one inviting us back, across a healed partition, or another): go on without us.
            await reply(self.node, msg.sender, msg.epoch, job_id, False, f"{self.node.node_id} is busy with a job", "")
            return None
        error: str | None = None
        spec: JobSpec | None = None
        workload: Workload | None = None
        inputs: PlanInputs | None = None
        try:
            spec = JobSpec.from_wire(meta.get("job"))
            if not self.admit:
                raise JobError(f"{self.node.node_id} does not join running jobs (admit=False)")
            if (spec.checkpoint_every or spec.resume) and self.checkpoint_dir is None:
                raise JobError(f"{self.node.node_id} has no checkpoint directory for a checkpointing job")
            if spec.strategy in PLANNED:
                inputs = PlanInputs.from_wire(meta, spec, self.split, frozenset() if spec.submitter_trains
                                              else frozenset({submitter_of(job_id)}))
            workload = await asyncio.get_running_loop().run_in_executor(
                None, lambda: resolve(spec, allowed_modules=self.allow_entry))
        except JobError as exc:
            error = str(exc)
        except Exception as exc:  # a user's entry point may raise anything
            error = f"building the workload failed: {type(exc).__name__}: {exc}"
        data = workload.data_digest if workload is not None else ""
        admission = await reply(self.node, msg.sender, msg.epoch, job_id, error is None, error or "", data)
        if admission is None:
            if error:
                logger.warning("declined to join job %s: %s", job_id, error)
            return None
        assert spec is not None and workload is not None
        view, plan = admission
        logger.warning("joining the running job %s (view %d, %d members)", job_id, view.epoch, len(view))
        if spec.strategy in PLANNED:
            assert inputs is not None
            inputs.devices = PlanInputs.devices_from_wire(plan.get("devices") if isinstance(plan, dict) else None)
            work = self._pipeline(spec, workload, view, job_id, inputs, joining=plan["layout"])
        else:
            work = self._run_data(spec, workload, job_id, view=view, joining=True)
        return await self._guarded(job_id, view, work, resilient=self.recover)

    def _admission(self, job_id: str, spec: JobSpec, workload: Workload, inputs: PlanInputs | None) -> Any:
        """The ``admit`` hook of this member's trainer: who trains on after a view change."""

        def plan(view: View) -> dict[str, Any]:  # the leader only: estimate the newcomers, plan on everyone
            assert inputs is not None
            inputs.estimate(view, {m.node_id: m.resources for m in self.node.members()})
            layout, micro = inputs.layout(view)
            return {"layout": layout_to_wire(layout, micro), "devices": inputs.devices_to_wire()}

        async def admit(old: View, new: View) -> Admission:
            data, fits = workload.data_digest, members_fit(spec, workload)
            view, decided = await decide(
                self.node, old, new, job=job_id, spec_wire=spec.to_wire(), data=data, allow=self.admit and spec.admit, fits=fits,
                plan=plan if inputs is not None else None, extra=inputs.to_wire() if inputs is not None else None)
            if decided is None:
                return view, None
            if inputs is not None:  # everyone takes the leader's figures, so later re-plans agree
                inputs.devices = PlanInputs.devices_from_wire(decided.get("devices") if isinstance(decided, dict) else None)
                if self.on_plan is not None:  # the leader's plan, shown here too (same figures, same plan)
                    self.on_plan(inputs.plan(view))
            return view, decided["layout"]

        return admit

    async def _run_pipeline(self, spec: JobSpec, workload: Workload, view: View, job_id: str) -> TrainResult:
        from p2ptrain.plan import agree_on_plan, default_profile_cache

        exclude = frozenset() if spec.submitter_trains else frozenset({submitter_of(job_id)})
        self.last_plan_timings, auto = {}, spec.strategy == "auto" and self.split == "planned"
        probes = compute_pool("p2ptrain-probe")  # probes are torch compute: nicer than the host, as training is
        try:
            plan, costs, devices, model, entry = await agree_on_plan(
                self.node, view, workload, global_batch=spec.global_batch, micro_batches=spec.micro_batches or None,
                schedule=spec.schedule, job=job_id, cache=default_profile_cache(self.node.state_dir), pool=probes,
                exclude=exclude, device=self.device, power=device_power(self._meter(), self.node),
                busy_per_cpu_s=busy_per_cpu_s(self._meter(), self.node),
                objective=spec.objective, max_slowdown=spec.max_slowdown, max_j_per_sample=0.0 if auto else
                spec.max_j_per_sample, replica_every=spec.replica_every, timings=self.last_plan_timings)
        finally:
            probes.shutdown(wait=False)
        if auto:  # the plan, or sequence or tensor parallelism: run as the concrete job
            self.last_plan_inputs = (plan, costs, devices, model)
            self.last_choice, spec, plan = auto_choice(spec, workload, plan, costs, [
                d for d in devices if d.node_id not in exclude], model, members=len(view))
            logger.info("job %s: auto chose %s (%s)", job_id, self.last_choice.strategy, self.last_choice.options)
            if self.on_choice is not None:
                self.on_choice(self.last_choice)
            if spec.strategy != "pipeline":
                return await self._run_data(spec, workload, job_id, view=view)
        inputs = PlanInputs(costs, devices, model, spec, self.split, exclude, entry)
        if self.split != "planned":  # a baseline for benchmarks and the study
            plan = inputs.plan(view)
        self.last_plan_inputs = (plan, costs, devices, model)
        if self.on_plan is not None:
            self.on_plan(plan)
        return await self._pipeline(spec, workload, view, job_id, inputs, stages=layout_from_plan(plan),
                                    micro=plan.micro_batches)

    async def _pipeline(self, spec: JobSpec, workload: Workload, view: View, job_id: str, inputs: PlanInputs, *,
                        stages: Any = None, micro: int = 0, joining: Any = None) -> TrainResult:
        """Train a pipeline job here: from its start, or joining it with the leader's layout."""
        from p2ptrain.train.pipeline._trainer import PipelineTrainer

        def taken(again: Any, v: View) -> tuple[list[Any], int]:
            self.last_plan_inputs = (again, inputs.costs, [d for d in inputs.devices if d.node_id in v], inputs.model)
            if self.on_plan is not None:
                self.on_plan(again)
            return layout_from_plan(again), again.micro_batches

        def replan(survivors: View) -> tuple[list[Any], int]:
            """The plan on the survivors, from the measurements the job has (no new probes)."""
            return taken(inputs.plan(survivors), survivors)

        proposed: list[tuple[Any, View]] = []  # shown (on_plan) once the members have moved to it

        def rebalance(v: View, layout: list[Any], micro: int, measured: dict[str, float], ran_s: float) -> tuple[list[Any], int] | None:
            """A better plan on the layout's measured compute and step (planned jobs; PlanInputs.rebalance)."""
            proposed[:] = [(again, v)] if (again := inputs.rebalance(v, layout, micro, measured, ran_s)) else []
            return (layout_from_plan(again), again.micro_batches) if again else None

        if joining is not None:
            stages, micro = layout_from_wire(joining)
        # Built off the loop, as a data-parallel trainer is: splitting the model, bucketing the
        # gradients and starting the stage thread are milliseconds the host's loop need not wait.
        trainer = await asyncio.get_running_loop().run_in_executor(None, lambda: PipelineTrainer(
            self.node, workload, stages=stages, global_batch=spec.global_batch,
            micro_batches=micro, steps=spec.steps, seed=spec.seed, lr=spec.lr, schedule=spec.schedule,
            codec=spec.codec, on_step=self.on_step, view=view, job=job_id, recover=self.recover, replan=replan,
            rebalance=rebalance, replica_every=spec.replica_every, checkpoints=self._checkpoints(spec),
            checkpoint_every=spec.checkpoint_every, resume=spec.resume and joining is None,
            manifest={"job": spec.to_wire()}, admit=self._admission(job_id, spec, workload, inputs),
            joining=joining is not None, device=self.device, offload=self.offload,
        ))
        self.last_trainer, trainer.stop_reason = trainer, self._stop
        trainer.on_moved = lambda step: taken(*proposed[-1])
        trainer.on_applied = self.on_applied
        trainer.energy = StepEnergy(self._meter(), wire_bytes(self.node))
        result = await trainer.run()
        await weights_back(trainer, result, submitter_of(job_id))  # the whole model to the submitter
        await trainer.raise_if_stopped()  # a stop ended the run at one step everywhere: the model went back first
        return result

    def _meter(self) -> Any:
        """This member's energy meter (a sensor where the OS has one, else a guessed power profile)."""
        if self._energy_meter is None:
            from p2ptrain.energy import EnergyMeter

            self._energy_meter = EnergyMeter.open()
        return self._energy_meter

    def _checkpoints(self, spec: JobSpec) -> Checkpoints | None:
        if self.checkpoint_dir is None or not (spec.checkpoint_every or spec.resume):
            return None
        return Checkpoints(self.checkpoint_dir, spec.lineage(), self.node.node_id)

    async def _accept_and_run(self, job_id: str, spec: JobSpec | None, epoch: int, early_error: str | None = None,
                              own: bool = False) -> TrainResult:
        """Check, agree and train a job; ``own``: this member submitted it, so it may import the spec's module."""
        node, self.last_choice = self.node, None
        if self._warming is not None:  # answer once warm (done or failed): the others' probes follow
            await asyncio.wait([self._warming])
        with contextlib.suppress(asyncio.TimeoutError):  # the submitter may have installed the view a heartbeat earlier
            await asyncio.wait_for(until(node, lambda: node.view.epoch >= epoch), VIEW_GRACE)
        view = node.view
        workload: Workload | None = None
        error = early_error
        if view.epoch != epoch:
            error = f"it was offered in view {epoch} but {node.node_id} is at view {view.epoch}; submit again"
            refuse(self, job_id, epoch, error)
            raise JobError(f"job {job_id}: {error}")
        if error is None and spec is not None:
            error = offer_refusal(spec, len(view), node.node_id, self.checkpoint_dir is not None, self.device, job_id)
            if error is None:
                try:
                    workload = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: resolve(spec, allowed_modules=None if own else self.allow_entry))
                    error = refusal(spec, workload, len(view))
                except JobError as exc:
                    error = str(exc)
                except Exception as exc:  # a user's entry point may raise anything
                    error = f"building the workload failed: {type(exc).__name__}: {exc}"
        ok = error is None
        data = workload.data_digest if workload is not None else ""
        acks: dict[str, tuple[bool, str, str]] = {node.node_id: (ok, error or "", data)}

        async def collect(m: str) -> None:
            msg = await node.take(ACK, [job_id, m], epoch=epoch)
            meta = msg.meta if isinstance(msg.meta, dict) else {}
            acks[m] = (meta.get("ok") is True, str(meta.get("error", ""))[:2000], str(meta.get("data", ""))[:64])

        ack = {"ok": ok, "error": error or "", "data": data}
        try:
            for m in view.members:
                if m != node.node_id:
                    await send_or_fail(node, m, ACK, epoch=epoch, tag=[job_id, node.node_id], meta=ack, timeout=30)
            answered = await gather_within((collect(m) for m in view.members if m != node.node_id), ACK_TIMEOUT)
        except PeerFailedError as exc:  # nobody trains it: the members' answers were for a view that is gone
            raise StartInterrupted(f"job {job_id} could not start: {exc}") from exc
        if not answered:
            missing = [m for m in view.members if m not in acks]
            raise JobError(f"job {job_id}: no answer from {', '.join(missing)} within {ACK_TIMEOUT:.0f}s")
        refused: dict[str, list[str]] = {}  # one line per reason, naming every member that gave it
        for m, (k, e, _) in acks.items():
            if not k:
                refused.setdefault(e, []).append(m)
        if refused:
            raise JobError("; ".join(f"member{'s' if len(ms) > 1 else ''} {', '.join(ms)} refused job {job_id}: {e}"
                                     for e, ms in refused.items()))
        digests = {d for _, _, d in acks.values()}
        if len(digests) > 1:
            raise JobError(
                f"job {job_id}: members hold different training data ("
                + ", ".join(f"{m}={d}" for m, (_, _, d) in acks.items()) + "); every member needs the same data"
            )
        assert spec is not None and workload is not None
        logger.info("job %s accepted by all %d members; training", job_id, len(view))
        if spec.strategy in PLANNED:
            return await self._guarded(job_id, view, self._run_pipeline(spec, workload, view, job_id),
                                       resilient=self.recover)
        return await self._guarded(job_id, view, self._run_data(spec, workload, job_id), resilient=self.recover)

    async def _run_data(self, spec: JobSpec, workload: Workload, job_id: str, *, view: View | None = None,
                        joining: bool = False) -> TrainResult:
        # Built off the loop: the first optimizer in a process imports torch._dynamo (~2-3 s of stalled heartbeats).
        trainer = await asyncio.get_running_loop().run_in_executor(None, lambda: make_trainer(
            spec, self.node, workload, global_batch=spec.global_batch, steps=spec.steps, seed=spec.seed, lr=spec.lr,
            codec=spec.codec, bucket_bytes=spec.bucket_bytes, digest_every=spec.digest_every, on_step=self.on_step,
            job=job_id, recover=self.recover, checkpoints=self._checkpoints(spec),
            checkpoint_every=spec.checkpoint_every, resume=spec.resume and not joining, manifest={"job": spec.to_wire()},
            view=view, admit=self._admission(job_id, spec, workload, None), joining=joining,
            device=self.device, offload=self.offload,
        ))
        self.last_trainer, trainer.stop_reason = trainer, self._stop
        trainer.on_applied = self.on_applied
        trainer.energy = StepEnergy(self._meter(), wire_bytes(self.node))
        result = await trainer.run()
        await weights_back(trainer, result, submitter_of(job_id))  # the whole model to the submitter
        return result

    async def _guarded(self, job_id: str, view: View, work: Coroutine[Any, Any, TrainResult],
                       resilient: bool = False) -> TrainResult:
        """Run a job's training here; a failure here stops every member, and theirs stops this one."""
        self.last_trainer, self._stop = None, None  # this job's, once built (a stop before this returned False)
        self._training = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(stop_when_gone(self.node, submitter_of(job_id), self.stop))
        try:
            return await guarded(self.node, job_id, view, self._training, resilient, lambda: getattr(self.last_trainer, "next_step", None))
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
