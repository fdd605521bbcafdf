"""Pipeline-parallel training with data-parallel groups inside stages.

Files:

- ``_trainer.py``  :class:`PipelineTrainer`, :class:`Stage`, layouts from plans
"""

from __future__ import annotations

from p2ptrain.train.pipeline._trainer import (
    PipelineTrainer,
    Stage,
    even_split,
    layout_from_plan,
)

__all__ = [
    "PipelineTrainer",
    "Stage",
    "even_split",
    "layout_from_plan",
]
