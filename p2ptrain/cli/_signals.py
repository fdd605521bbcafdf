"""A stop signal that arrives twice at once is one stop.

``train`` stops the job in order at the first Ctrl-C (or SIGTERM) and quits at once at a
second. GNU ``timeout -s INT`` delivers its signal twice (to the command, then to its
process group), and a walkthrough's ``timeout -s INT 15 p2ptrain train ...`` quit at once
and lost the model, 2 runs of 2. So a repeat within :data:`ECHO_S` of the first is the same
stop; only a signal after that is the second one. ``join`` hands its part over at the first and
quits at once, as a kill would, at the second (:func:`quit_after`): its echo quit as well, and
the others recovered from a kill where an orderly leave was asked.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ECHO_S", "interrupt_after", "quit_after"]

#: A repeat this soon after the first stop signal is the same one (a person's second Ctrl-C is slower).
ECHO_S = 0.5


def interrupt_after(quiet_until: float) -> Callable[[int, Any], None]:
    """A Python signal handler that raises KeyboardInterrupt, as Ctrl-C's own does, except for
    echoes that come before ``quiet_until`` (``time.monotonic()``): they are ignored."""

    def handler(signum: int, frame: Any) -> None:
        if time.monotonic() >= quiet_until:
            raise KeyboardInterrupt

    return handler


def quit_after(quiet_until: float) -> Callable[[int, Any], None]:
    """A Python signal handler that ends the process by the signal's default action (SIGINT:
    at once, as a kill would), except for echoes before ``quiet_until``: they are ignored."""

    def handler(signum: int, frame: Any) -> None:
        if time.monotonic() >= quiet_until:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handler
