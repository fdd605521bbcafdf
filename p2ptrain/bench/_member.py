"""A bench member process starts as a ``p2ptrain join`` member does, so the benches measure what users run.

The ``p2ptrain`` command installs uvloop and keeps freed memory in the C heap
(:func:`p2ptrain.transport.keep_heap_warm`) before it starts a member; a bench's member
processes (``python -m p2ptrain.bench._NAME``) do not pass through that command, and
ran asyncio's default loop until the nineteenth session: measured on the 64 MiB
all-reduce, three interleaved pairs, ratio to gloo 1.94, 2.11, 1.71 on the default
loop against 1.54, 1.32, 1.46 on uvloop (docs/performance.md).
"""

from __future__ import annotations

__all__ = ["member_process"]


def member_process() -> None:
    """Set this process up as the ``p2ptrain`` command sets up a member's: uvloop, a warm C heap."""
    from p2ptrain._entry import install_uvloop
    from p2ptrain.transport import keep_heap_warm

    install_uvloop()
    keep_heap_warm()
