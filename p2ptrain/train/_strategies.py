"""Which trainer runs a replica-style job: every member holds the model (or its share of it).

The pipeline strategy has its own path (:mod:`p2ptrain.train.pipeline`: a plan, stages,
a schedule). Every other strategy runs on a trainer built like
:class:`~p2ptrain.train.DataParallelTrainer` (same constructor keywords, same ``run``,
``leave``, ``on_applied`` and ``energy``), chosen here by the job's ``strategy``, so
:class:`~p2ptrain.train.JobService` runs them all the same way.

A job with ``strategy="auto"`` agrees on a plan as a pipeline job does; :func:`auto_choice`
then weighs the plan against sequence and tensor parallelism (:mod:`p2ptrain.plan._auto`)
and names the concrete job the members run when one of those wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from p2ptrain._device import first_on
from p2ptrain._errors import ConfigError, JobError
from p2ptrain.ring import Node
from p2ptrain.train._dataparallel import DataParallelTrainer
from p2ptrain.train._job import PLANNED, JobSpec
from p2ptrain.train._sequence import SequenceParallelTrainer
from p2ptrain.train._sequence import members_fit as sequence_fit
from p2ptrain.train._sequence import refusal as sequence_refusal
from p2ptrain.train._tensor import TensorParallelTrainer
from p2ptrain.train._tensor import refusal as tensor_refusal
from p2ptrain.zoo import Workload

if TYPE_CHECKING:
    from p2ptrain.plan import CostModel, Device, LayerCost, Plan, StrategyChoice

__all__ = ["auto_choice", "make_trainer", "members_fit", "offer_refusal", "refusal"]


def make_trainer(spec: JobSpec, node: Node, workload: Workload, **common: Any) -> DataParallelTrainer:
    """The trainer for ``spec.strategy``, built with the keywords every trainer takes.

    Runs on a worker thread (building an optimizer imports torch._dynamo).

    Raises:
        ConfigError: ``spec.strategy`` has no replica-style trainer (``"pipeline"``).
        JobError: two members of this process would share an accelerator (:func:`shared_device`).
    """
    if spec.strategy == "data":
        return DataParallelTrainer(node, workload, **common)
    device = common.get("device")  # an auto job's choice meets this here; an explicit one was refused at the offer
    if isinstance(device, torch.device) and (why := shared_device(spec.strategy, device, common["job"], node.node_id)):
        raise JobError(why)
    if spec.strategy == "tensor":
        return TensorParallelTrainer(node, workload, shares=spec.shares, **common)
    if spec.strategy == "sequence":
        return SequenceParallelTrainer(node, workload, shares=spec.shares, **common)
    raise ConfigError(f"strategy {spec.strategy!r} has no replica-style trainer")


def shared_device(strategy: str, device: torch.device, job_id: str, node_id: str) -> str | None:
    """Why member ``node_id`` cannot take job ``job_id``'s ``strategy`` on ``device``, or None.

    A tensor- or sequence-parallel backward waits for the other members inside it, and
    PyTorch runs an accelerator's backward passes on one thread per process
    (:func:`p2ptrain._device.first_on`): the second member of a process on one device refuses.
    """
    if strategy not in ("tensor", "sequence") or device.type == "cpu":
        return None
    if (first := first_on(job_id, device, node_id)) == node_id:
        return None
    return (f"{node_id} would share {device} with {first}, a member of this job in the same process; a "
            f"{strategy}-parallel backward waits for the other members inside it, and PyTorch runs a "
            "device's backward passes on one thread per process, so the two would wait for each other "
            "forever. Run each member in its own process (p2ptrain join), or put one of them on the CPU")


def refusal(spec: JobSpec, workload: Workload, members: int) -> str | None:
    """Why this member refuses ``spec`` over ``members`` members once its workload is built; None: it fits."""
    if spec.strategy == "sequence":
        return sequence_refusal(spec, workload, members)
    if spec.strategy == "tensor":
        return tensor_refusal(spec, workload, members)
    if spec.strategy in PLANNED:  # cut into stages of layers (it failed in every member once the ring formed)
        try:
            workload.layers()
        except JobError as exc:
            return str(exc)
    return None


def batch_refusal(spec: JobSpec) -> str | None:
    """Why any member refuses ``spec``'s batch whatever the ring (also checked where a job is written), or None."""
    if spec.strategy in PLANNED and spec.micro_batches and spec.global_batch % spec.micro_batches:
        return f"global_batch {spec.global_batch} does not split into {spec.micro_batches} micro-batches"
    return None


def offer_refusal(spec: JobSpec, members: int, node_id: str, has_checkpoint_dir: bool,
                  device: torch.device | None = None, job_id: str = "") -> str | None:
    """Why member ``node_id`` (computing on ``device``) refuses offered job ``job_id`` before building its workload, or None."""
    if (why := batch_refusal(spec)) is not None:
        return why
    if device is not None and (why := shared_device(spec.strategy, device, job_id, node_id)) is not None:
        return why
    if spec.strategy == "data" and spec.global_batch < members:
        return f"global_batch {spec.global_batch} is smaller than the {members} members; use {members} or more"
    if not spec.submitter_trains and members < 2:
        return "the submitter stays out of the plan (submitter_trains=False) but no other member is in the ring"
    if (spec.checkpoint_every or spec.resume) and not has_checkpoint_dir:
        return (f"the job {'resumes from' if spec.resume else 'writes'} checkpoints but {node_id} has "
                "no checkpoint directory; start it with --checkpoint-dir DIR")
    return None


def members_fit(spec: JobSpec, workload: Workload) -> Callable[[int], bool]:
    """Whether ``spec`` can run on that many members (a job asks no more newcomers in than fit)."""
    if spec.strategy == "data":
        return lambda n: spec.global_batch >= n  # a sample per member at least; shares may differ by one
    if spec.strategy == "sequence":
        return sequence_fit(workload)
    return lambda n: True


def auto_choice(spec: JobSpec, workload: Workload, plan: Plan, costs: Sequence[LayerCost], devices: Sequence[Device],
                model: CostModel, *, members: int) -> tuple[StrategyChoice, JobSpec, Plan]:
    """What an ``auto`` job runs: the planner's plan, or sequence or tensor parallelism.

    Args:
        spec: the job (``strategy="auto"``).
        workload: the job's workload, built on this member.
        plan, costs, devices, model: what :func:`~p2ptrain.plan.agree_on_plan` returned
            (identical on every member, so every member chooses alike); ``devices`` those
            that may train. A replica strategy trains on every member of the view, so it
            is weighed only when all ``members`` may train.

    Returns:
        The :class:`~p2ptrain.plan.StrategyChoice`; the concrete job the members run
        (``strategy`` ``"pipeline"``, ``"sequence"`` or ``"tensor"``: its checkpoints,
        manifest and newcomers name what ran, and a resume names it too); and the plan
        to run when that is the pipeline.

    Raises:
        PlanError: no option meets the job's ``max_j_per_sample``.
    """
    from p2ptrain.plan import choose_strategy

    def concrete(strategy: str, shares: tuple[float, ...]) -> JobSpec:
        fields: dict[str, Any] = {**spec.to_wire_fields(), "strategy": strategy, "shares": shares}
        if strategy != "pipeline":  # the objective and budgets were the planner's; they are spent
            fields.update(micro_batches=1, objective="time", max_slowdown=0.0, max_j_per_sample=0.0)
        return JobSpec(**fields)

    def can_run(strategy: str, shares: tuple[float, ...]) -> str | None:
        if len(devices) != members:
            return "the job leaves a member out of training"
        return refusal(concrete(strategy, shares), workload, members)

    plan_kw = {"global_batch": spec.global_batch, "micro_batches": spec.micro_batches or None,
               "schedule": spec.schedule, "replica_every": spec.replica_every if members > 1 else 0, **model._asdict()}
    choice = choose_strategy(plan, costs, devices, model._asdict(), objective=spec.objective,
                             max_slowdown=spec.max_slowdown, max_j_per_sample=spec.max_j_per_sample, can_run=can_run,
                             plan_kw=plan_kw)
    return choice, concrete(choice.strategy, choice.shares), choice.plan or plan
