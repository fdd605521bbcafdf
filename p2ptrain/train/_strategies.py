"""Which trainer runs a replica-style job: every member holds the model (or its share of it).

The pipeline strategy has its own path (:mod:`p2ptrain.train.pipeline`: a plan, stages,
a schedule). Every other strategy runs on a trainer built like
:class:`~p2ptrain.train.DataParallelTrainer` (same constructor keywords, same ``run``,
``leave``, ``on_applied`` and ``energy``), chosen here by the job's ``strategy``, so
:class:`~p2ptrain.train.JobService` runs them all the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from p2ptrain._errors import ConfigError
from p2ptrain.ring import Node
from p2ptrain.train._dataparallel import DataParallelTrainer
from p2ptrain.train._job import JobSpec
from p2ptrain.train._sequence import SequenceParallelTrainer
from p2ptrain.train._sequence import members_fit as sequence_fit
from p2ptrain.train._sequence import refusal as sequence_refusal
from p2ptrain.train._tensor import TensorParallelTrainer
from p2ptrain.train._tensor import refusal as tensor_refusal
from p2ptrain.zoo import Workload

__all__ = ["make_trainer", "members_fit", "refusal"]


def make_trainer(spec: JobSpec, node: Node, workload: Workload, **common: Any) -> DataParallelTrainer:
    """The trainer for ``spec.strategy``, built with the keywords every trainer takes.

    Runs on a worker thread (building an optimizer imports torch._dynamo).

    Raises:
        ConfigError: ``spec.strategy`` has no replica-style trainer (``"pipeline"``).
    """
    if spec.strategy == "data":
        return DataParallelTrainer(node, workload, **common)
    if spec.strategy == "tensor":
        return TensorParallelTrainer(node, workload, shares=spec.shares, **common)
    if spec.strategy == "sequence":
        return SequenceParallelTrainer(node, workload, shares=spec.shares, **common)
    raise ConfigError(f"strategy {spec.strategy!r} has no replica-style trainer")


def refusal(spec: JobSpec, workload: Workload, members: int) -> str | None:
    """Why this member refuses ``spec`` over ``members`` members once its workload is built; None: it fits."""
    if spec.strategy == "sequence":
        return sequence_refusal(spec, workload, members)
    if spec.strategy == "tensor":
        return tensor_refusal(spec, workload, members)
    return None


def members_fit(spec: JobSpec, workload: Workload) -> Callable[[int], bool]:
    """Whether ``spec`` can run on that many members (a job asks no more newcomers in than fit)."""
    if spec.strategy == "data":
        return lambda n: spec.global_batch % n == 0
    if spec.strategy == "sequence":
        return sequence_fit(workload)
    return lambda n: True
