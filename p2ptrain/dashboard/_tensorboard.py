"""Step metrics as TensorBoard event files (``--tensorboard DIR``), for users who keep that habit.

Written with tensorboardX (the ``tensorboard`` extra: ``pip install
'p2ptrain[tensorboard]'``): a small package (numpy, protobuf) that writes the event
files without TensorFlow or the TensorBoard server; ``tensorboard --logdir DIR`` reads
them. Its writer queues events for its own thread, so a step costs the loop a few
microseconds.

Scalars per step: ``loss``, ``samples_per_s``, ``step_s``, ``compute_s``,
``comm_wait_s``, ``members``; ``busy/<member>`` and ``joules/<member>`` where the step
carries them; the pipeline plan as text at each (re-)plan.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from p2ptrain._errors import ConfigError
from p2ptrain.dashboard._share import chain_hook

__all__ = ["TENSORBOARD_HINT", "TensorBoardLog", "require_tensorboard"]

logger = logging.getLogger(__name__)

TENSORBOARD_HINT = "pip install 'p2ptrain[tensorboard]'"


def require_tensorboard() -> None:
    """Raise :class:`ConfigError` naming the extra to install when tensorboardX is missing."""
    if importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError(f"--tensorboard needs tensorboardX, which is not installed: {TENSORBOARD_HINT}")


class TensorBoardLog:
    """Write each step's metrics under ``logdir`` as TensorBoard events.

    Args:
        logdir: the folder (created if missing); one run's events go to one file in it.
        members_of: the job's members in ring order now (labels ``busy/*`` and
            ``joules/*``); without it those are labelled by rank.

    Raises:
        ConfigError: tensorboardX is not installed.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, members_of: Callable[[], Sequence[str]] | None = None) -> None:
        require_tensorboard()
        from tensorboardX import SummaryWriter

        self.logdir = os.fspath(logdir)
        self.members_of = members_of
        self._writer: Any = SummaryWriter(logdir=self.logdir, flush_secs=5)
        self._closed = False

    def attach(self, jobs: Any) -> TensorBoardLog:
        """Follow the steps and plans of ``jobs`` (a :class:`p2ptrain.JobService`) by chaining its hooks."""
        jobs.on_step = chain_hook(jobs.on_step, self.on_step)
        jobs.on_plan = chain_hook(jobs.on_plan, self.on_plan)
        if self.members_of is None:
            def members() -> Sequence[str]:
                view = getattr(getattr(jobs, "last_trainer", None), "view", None) or jobs.node.view
                return list(view.members)

            self.members_of = members
        return self

    def on_step(self, m: Any) -> None:
        """Write one step (a :class:`p2ptrain.StepMetrics`)."""
        if self._closed:
            return
        w, step = self._writer, int(m.step)
        for name in ("loss", "samples_per_s", "step_s", "compute_s", "comm_wait_s", "members"):
            value = float(getattr(m, name))
            if math.isfinite(value):
                w.add_scalar(name, value, step)
        members = list(self.members_of()) if self.members_of is not None else []
        for key, values in (("busy", m.busy), ("joules", m.joules)):
            for i, v in enumerate(values):
                label = members[i] if len(values) == len(members) else f"rank{i}"
                w.add_scalar(f"{key}/{label}", float(v), step)

    def on_plan(self, plan: Any) -> None:
        """Record a pipeline plan as text (the table the CLI prints)."""
        if not self._closed:
            table = plan.table() if hasattr(plan, "table") else str(plan)
            self._writer.add_text("plan", "    " + table.replace("\n", "\n    "))  # markdown code block

    def close(self) -> None:
        """Flush and close the event file. Idempotent."""
        if not self._closed:
            self._closed = True
            self._writer.close()
