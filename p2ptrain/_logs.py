"""How ``-v`` becomes log output: one rule for the ``p2ptrain`` command and the member processes its benches start."""

from __future__ import annotations

import logging
import sys

__all__ = ["log_to_stderr"]


def log_to_stderr(verbose: int) -> None:
    """Log to stderr at WARNING, INFO for ``verbose`` 1, DEBUG for 2 or more."""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
