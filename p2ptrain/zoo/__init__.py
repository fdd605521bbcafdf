"""The model zoo: what a job trains, as a :class:`Workload`.

Layer: above ``ring`` only by convention (it imports nothing of it): torch models and
their data, built the same on every member from a name, a seed and keyword arguments.

Files:

- ``_zoo.py``       :class:`Workload`, the registry :data:`ZOO`, :func:`build`, tinygpt, mlp
- ``_datasets.py``  the indexable datasets (:class:`CharWindows`, :class:`TensorPairs`) and
                    :func:`stack_collate`
"""

from __future__ import annotations

from p2ptrain.zoo._datasets import CharWindows, TensorPairs, stack_collate
from p2ptrain.zoo._zoo import (
    ZOO,
    Workload,
    build,
    default_optimizer,
    mlp,
    tinygpt,
)

__all__ = [
    "CharWindows",
    "TensorPairs",
    "Workload",
    "ZOO",
    "build",
    "default_optimizer",
    "mlp",
    "stack_collate",
    "tinygpt",
]
