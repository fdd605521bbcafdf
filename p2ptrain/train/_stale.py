"""Whether a job's entry-point module on disk is still the code this process runs.

A ``join`` imports a job's module once and keeps it for every later job. A walkthrough
edited its model's forward (Tanh to ReLU) between two jobs: the fresh submitter trained
the new code, the long-running members the old, and the job ended with exit 0 and a model
from neither. :func:`stale` records each module's source hash the first time a job uses it
and refuses a later job when the file has changed since.
"""

from __future__ import annotations

import hashlib
import threading
from types import ModuleType

__all__ = ["stale"]

_SEEN: dict[str, str] = {}  # module name -> sha256 of its source file when a job first used it
_LOCK = threading.Lock()  # members of one process resolve on worker threads


def stale(module: ModuleType) -> str | None:
    """Why ``module``'s source file is not the code this process imported, or None."""
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    with _LOCK:
        first = _SEEN.setdefault(module.__name__, digest)
    if first == digest:
        return None
    return (f"{path} changed since this process imported {module.__name__!r} for an earlier job, and it still "
            "runs the old code; restart it (p2ptrain join) to train the new one")
