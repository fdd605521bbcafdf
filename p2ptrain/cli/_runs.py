"""The demo's run folders: a fresh one per run, removed again when the run wrote nothing."""

from __future__ import annotations

import time
from pathlib import Path

from p2ptrain._errors import ConfigError

__all__ = ["discard_if_empty", "new_run_dir"]


def new_run_dir(root: Path) -> Path:
    """A fresh ``root/<time>`` folder (``-2``, ``-3``, ... when two runs start in one second)."""
    base = root / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            if not root.is_dir():
                raise ConfigError(f"--runs-dir {root} is a file, not a folder") from None
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as exc:
            raise ConfigError(f"--runs-dir {root}: cannot make a run folder there: {exc.strerror or exc}") from None


def discard_if_empty(run_dir: Path) -> None:
    """Remove a run folder that holds no metrics (the run failed before its first step)."""
    if (run_dir / "metrics.jsonl").exists():
        return
    try:
        (run_dir / "peers.log").unlink(missing_ok=True)
        run_dir.rmdir()  # only if nothing else is in it
    except OSError:
        pass
