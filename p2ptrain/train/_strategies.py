"""Which trainer runs a replica-style job: every member holds the model (or its share of it).

The pipeline strategy has its own path (:mod:`p2ptrain.train.pipeline`: a plan, stages,
a schedule). Every other strategy runs on a trainer built like
:class:`~p2ptrain.train.DataParallelTrainer` (same constructor keywords, same ``run``,
``leave``, ``on_applied`` and ``energy``), chosen here by the job's ``strategy``, so
:class:`~p2ptrain.train.JobService` runs them all the same way.
"""

from __future__ import annotations

from typing import Any

from p2ptrain._errors import ConfigError
from p2ptrain.ring import Node
from p2ptrain.train._dataparallel import DataParallelTrainer
from p2ptrain.train._job import JobSpec
from p2ptrain.zoo import Workload

__all__ = ["make_trainer"]


def make_trainer(spec: JobSpec, node: Node, workload: Workload, **common: Any) -> DataParallelTrainer:
    """The trainer for ``spec.strategy``, built with the keywords every trainer takes.

    Runs on a worker thread (building an optimizer imports torch._dynamo).

    Raises:
        ConfigError: ``spec.strategy`` has no replica-style trainer (``"pipeline"``).
    """
    if spec.strategy == "data":
        return DataParallelTrainer(node, workload, **common)
    raise ConfigError(f"strategy {spec.strategy!r} has no replica-style trainer")
