"""Pipeline-parallel training with data-parallel groups inside stages.

Files:

- ``_layout.py``   :class:`Stage`, :func:`even_split`, layouts from plans; each member's
  seat and message routes (pure arithmetic, no sockets)
- ``_step.py``     ``PipelineStep``: one step of one member (receive, walk the schedule on
  the compute thread, send, sum the group's gradients)
- ``_keeper.py``   ``StageKeeper``: every stage's state copied to another member every K
  steps, and checkpoints written, off the critical path
- ``_reports.py``  a step's closing sum (loss, busy shares, joules, compute seconds) and
  its report, in step order, as soon as the sum is in
- ``_measured.py`` ``MeasuredSteps``: the layout's measured compute, and the one step at
  which every member checks the plan against it
- ``_moves.py``    ``LayoutMoves``: an orderly leave, a recovery (re-plan on the survivors,
  restore, replay), a move to a plan made on measured compute, a join and a resume
- ``_trainer.py``  :class:`PipelineTrainer`: the run loop, optimizer steps, reporting and
  timelines
"""

from __future__ import annotations

from p2ptrain.train.pipeline._layout import Stage, even_split, layout_from_plan
from p2ptrain.train.pipeline._trainer import PipelineTrainer

__all__ = [
    "PipelineTrainer",
    "Stage",
    "even_split",
    "layout_from_plan",
]
