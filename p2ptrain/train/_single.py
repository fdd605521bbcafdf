"""The reference run: one process trains a job with the whole global batch per step.

Every strategy must compute what :func:`train_single` computes on the same job, to float
tolerance (transparency).
"""

from __future__ import annotations

from torch import nn

from p2ptrain.train._data import GlobalSampler
from p2ptrain.train._job import JobSpec, resolve
from p2ptrain.zoo import Workload

__all__ = ["train_single"]


def train_single(
    spec: JobSpec, steps: int | None = None, *, workload: Workload | None = None
) -> tuple[nn.Module, list[float]]:
    """Train on one process, the whole global batch per step: the transparency baseline.

    Step ``s`` uses the batch at ``GlobalSampler(len(dataset), spec.global_batch,
    spec.seed).indices(s)``, the same indices the ring splits into shards.

    Args:
        spec: the job.
        steps: steps to run; default ``spec.steps``.
        workload: a workload already built with ``resolve(spec)`` (it is trained in
            place); default builds a fresh one.

    Returns:
        The trained model and the loss of each step (before that step's update).

    Raises:
        JobError: the workload cannot be built or the batch does not fit its data.
    """
    workload = resolve(spec) if workload is None else workload
    n = spec.steps if steps is None else steps
    model = workload.model
    model.train()
    optimizer = workload.make_optimizer(model.parameters(), spec.lr)
    sampler = GlobalSampler(len(workload.dataset), spec.global_batch, spec.seed)
    losses: list[float] = []
    for step in range(n):
        batch = workload.batch(sampler.indices(step))
        loss = workload.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return model, losses
