"""Run folders: a fresh one per run (the demo's, train's default), a folder claimed while a
run writes to it (train's ``--out``), removed again when the run wrote nothing; and the
pipeline flags train and demo read alike (:func:`pipeline_flags`)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from p2ptrain._errors import ConfigError

if sys.platform != "win32":
    import fcntl

__all__ = ["claimed", "discard_if_empty", "new_run_dir", "pipeline_flags"]

_LOCK = ".p2ptrain-run.lock"


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


@contextlib.contextmanager
def claimed(out: Path | None, default_root: Path) -> Iterator[Path]:
    """Make ``out`` (or a fresh ``default_root/train-<time>``) and hold it for one run.

    Two runs writing one folder overwrote each other's model and interleaved their
    metrics: the folder is claimed with an ``flock`` on a lock file inside it (released
    when the process ends, however it ends), and a second run is refused. The folders
    this made are removed again when the run left them empty.

    Raises:
        ConfigError: ``out`` holds a trained model, cannot be made, or another run holds it.
    """
    if out is None:
        base = default_root / time.strftime("train-%Y%m%d-%H%M%S")
        out, n = base, 1
        while out.exists():  # two runs started in one second
            n += 1
            out = base.with_name(f"{base.name}-{n}")
    if (out / "model.safetensors").exists() or (out / "p2ptrain-job.json").exists():
        raise ConfigError(f"--out {out} already holds a trained model; choose another folder or move that one away")
    made = [p for p in (out, *out.parents) if not p.exists()]  # what mkdir makes, deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "it is a file" if out.is_file() else exc.strerror or exc
        raise ConfigError(f"--out {out}: cannot make that folder: {why}") from None
    lock = out / _LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform != "win32":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                raise ConfigError(f"--out {out} is in use by another p2ptrain run (pid {holder}); "
                                  "give this one its own folder") from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        try:
            yield out
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            for folder in made:
                folder.rmdir()  # only an empty one


def pipeline_flags(args: Any) -> tuple[int, str]:
    """``(micro_batches, schedule)`` for the job; refused with a strategy that has no pipeline.

    ``--micro-batches 4`` and ``--schedule gpipe`` on a data job were silently ignored.
    """
    if args.strategy not in ("pipeline", "auto"):
        given = [f for f, v in (("--micro-batches", args.micro_batches), ("--schedule", args.schedule)) if v]
        if given:
            raise ConfigError(f"{' and '.join(given)} shape a pipeline's step; the {args.strategy} strategy has none "
                              "(use --strategy pipeline or auto, or leave them out)")
        return 1, "1f1b"
    return args.micro_batches, args.schedule or "1f1b"
