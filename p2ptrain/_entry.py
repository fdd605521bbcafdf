"""What a process that runs a member sets up once, at its entry point: the event loop.

uvloop (a dependency) runs a member's many small messages, timers and executor
hand-offs with less CPU than asyncio's default loop. Installing it changes a
process-wide policy, so only entry points call :func:`install_uvloop`: the
``p2ptrain`` command and the benches' member processes (which run as ``p2ptrain join``
runs), never the library on import and never a host that embeds a node: its loop is
its own.
"""

from __future__ import annotations

__all__ = ["install_uvloop"]


def install_uvloop() -> bool:
    """Make uvloop asyncio's loop policy for this process; False where it is not installed."""
    try:
        import uvloop
    except ImportError:  # optional on platforms without it: the default loop works too
        return False
    import asyncio

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
