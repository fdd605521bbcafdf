"""Benchmarks: each prints one JSON object with ``--json``, its baseline beside it.

Layer: the top, beside ``cli``. One module per ``p2ptrain bench NAME`` with
``add_arguments(parser)`` and ``main(args) -> int``; a module runs as a member process
with ``python -m p2ptrain.bench._NAME``.

Files:

- ``_transport.py``  the endpoint vs plain pyzmq, two processes on loopback
- ``_codecs.py``     encode/decode speed, wire ratio and error of each codec
- ``_discovery.py``  seconds until N local nodes agree on the full ring
- ``_allreduce.py``  ring all-reduce vs torch.distributed gloo
- ``_pipeline.py``   the planned pipeline vs its bound, an even split and one device
- ``_recovery.py``   a member killed mid-job: the survivors' recovery vs a restart from disk
- ``_embed.py``      a host's 100 Hz asyncio task beside an embedded, training node: how late it wakes
- ``_study.py``      the runs behind ``p2ptrain study``: one job per parallelism, metered
  (:func:`run_study`; the command and its table and picture are in ``cli``)
- ``_member.py``     a member process starts as ``p2ptrain join``'s does: uvloop, a warm C heap
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from p2ptrain.bench._study import ROWS, Row, compare, run_study, summarise

__all__ = ["ROWS", "Row", "compare", "run_study", "summarise"]


def __getattr__(name: str) -> object:
    """The study's names, imported on first use (PEP 562): ``python -m p2ptrain.bench._study``
    runs that module as ``__main__``, and an eager import here would load it twice."""
    if name in __all__:
        from p2ptrain.bench import _study

        return getattr(_study, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
