"""The ``p2ptrain`` command line: a thin layer over the library.

Layer: the top. One module per command with ``add_arguments(parser)`` and
``main(args) -> int``; ``_main.py`` wires them up.

Files:

- ``_main.py``     the parser, uvloop (entry points only), logging, error reporting
- ``_join.py``     ``p2ptrain join``
- ``_status.py``   ``p2ptrain status``
- ``_demo.py``     ``p2ptrain demo``
- ``_progress.py`` the progress line and ``metrics.jsonl`` of ``demo`` and ``train``
- ``_runs.py``     the demo's run folders: a fresh one per run, gone again when it wrote nothing
- ``_train.py``    ``p2ptrain train``: your model on the ring, the trained weights written back
- ``_split.py``    how a job without a planner splits its work (``train`` and ``demo`` print it)
- ``_study.py``    ``p2ptrain study``: every strategy on the same devices, time and energy
- ``_energy.py``   ``p2ptrain energy``: this device's joules over a few seconds
- ``_testbed.py``  ``p2ptrain testbed``
- ``_plot.py``     run.png: matplotlib when installed (``p2ptrain[plot]``), a basic picture otherwise
"""

from __future__ import annotations

from p2ptrain.cli._main import main

__all__ = [
    "main",
]
