"""Where copies of the training state live: in memory (own snapshots, peers' replicas) and on disk.

Recovery and resume put a consistent state together from whatever copies the members
hold (:mod:`p2ptrain.train._restore`). A copy is a set of *units* (pipeline layers, or
the whole model as unit 0, see :mod:`p2ptrain.train._state`) at a step: the state
after that many optimizer steps.

- :class:`StateStore` holds copies in memory, keyed by who they came from: this
  member's own snapshots, the replicas a peer sent, the live state at a failure. Each
  origin keeps its latest ``keep`` steps.
- :class:`Checkpoints` writes this member's units to disk and finds them again:

  ``<dir>/<lineage>/step-<step>/<node>.safetensors``  the tensors (no pickle)
  ``<dir>/<lineage>/step-<step>/<node>.json``         the manifest: job, step, units,
  the view, the file's size and sha256

  The tensors are written to a temporary name, flushed and renamed, then the manifest
  the same way: a checkpoint without a manifest is incomplete and ignored. Reading
  checks the size and the hash before anything is parsed, so a corrupt or truncated
  file is refused whole, with its path in the error. The ``lineage`` is the job's
  digest without the fields that do not change the trajectory (steps, checkpoint and
  replica cadence), so a resumed job may run longer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2ptrain._errors import JobError
from p2ptrain.train._state import Units, pack_units, unpack_units

if TYPE_CHECKING:
    from p2ptrain.train._job import JobSpec

__all__ = ["Checkpoints", "StateStore", "lineage_difference", "resume_point"]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8,12})$")
_MANIFEST_MAX = 1 << 20  # a manifest is a few KiB; anything bigger is not ours
FORMAT = 1


class StateStore:
    """Copies of units by (origin, step), the latest ``keep`` steps per origin."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._copies: dict[str, dict[int, Units]] = {}

    def put(self, origin: str, step: int, units: Units) -> None:
        """Hold ``units`` at ``step`` from ``origin``; its oldest step beyond ``keep`` is dropped."""
        held = self._copies.setdefault(origin, {})
        held[step] = units
        for old in sorted(held)[: -self.keep]:
            del held[old]

    def holdings(self) -> dict[int, set[int]]:
        """step -> the units held at that step (any origin)."""
        out: dict[int, set[int]] = {}
        for held in self._copies.values():
            for step, units in held.items():
                out.setdefault(step, set()).update(units)
        return out

    def get(self, step: int, units: Iterable[int]) -> Units:
        """The units asked for at ``step`` (each from whichever origin holds it); KeyError if one is missing."""
        out: Units = {}
        for u in units:
            for held in self._copies.values():
                if u in held.get(step, {}):
                    out[u] = held[step][u]
                    break
            else:
                raise KeyError(f"unit {u} at step {step}")
        return out

    def clear(self) -> None:
        self._copies.clear()

    def drop(self, origin: str) -> None:
        """Forget every copy from ``origin``."""
        self._copies.pop(origin, None)


class Checkpoints:
    """This member's checkpoints of one job lineage under ``root``.

    Args:
        root: the member's checkpoint directory (created if missing).
        lineage: the job's lineage digest (see the module docstring).
        node_id: this member; it writes ``<node_id>.*`` files only.
        keep: checkpoint steps of this member kept on disk.
    """

    def __init__(self, root: str | os.PathLike[str], lineage: str, node_id: str, *, keep: int = 2) -> None:
        self.dir = Path(root) / lineage
        self.lineage, self.node_id, self.keep = lineage, node_id, keep
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JobError(f"cannot create checkpoint directory {self.dir}: {exc}") from exc
        self.refused: list[str] = []  # what scan() found corrupt, for the error a user sees

    def write(self, step: int, units: Units, extra: dict[str, Any] | None = None) -> Path:
        """Write ``units`` at ``step`` atomically; returns the manifest's path (call it off the loop)."""
        blob = pack_units(units, step)
        where = self.dir / f"step-{step:08d}"
        data = where / f"{self.node_id}.safetensors"
        manifest = {
            "format": FORMAT, "lineage": self.lineage, "node": self.node_id, "step": step,
            "units": sorted(units), "file": data.name, "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(), **(extra or {}),
        }
        path = where / f"{self.node_id}.json"
        for attempt in range(3):
            # Members sharing a directory prune their old steps: an emptied step folder
            # may vanish between our mkdir and our write; make it again.
            try:
                where.mkdir(exist_ok=True)
                _atomic_write(data, blob)
                _atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        self._prune()
        return path

    def _prune(self) -> None:
        """Keep this member's ``keep`` latest steps; remove every member's files of the steps before them.

        Members of one job write the same steps, so a step older than this member's kept
        ones is one that every member running it has pruned too; what is left there is
        from earlier runs under other node ids (``train`` takes a fresh id per run), which
        no member would ever remove otherwise: the disk of a robot that resumes often filled.
        """
        mine = sorted(s for s, d in self._steps() if (d / f"{self.node_id}.json").exists())
        if len(mine) < self.keep:
            return
        floor = mine[-self.keep]
        for step, where in self._steps():
            if step >= floor:
                continue
            for f in where.iterdir():
                if f.suffix in (".json", ".safetensors") or f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # only if empty: anything else stays
                where.rmdir()

    def _steps(self) -> list[tuple[int, Path]]:
        out = []
        for d in self.dir.iterdir() if self.dir.is_dir() else ():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                out.append((int(m.group(1)), d))
        return out

    def scan(self) -> dict[int, dict[int, Path]]:
        """step -> unit -> the data file that holds it, over every complete, intact checkpoint here.

        Every member's files in the directory count (members sharing a disk share their
        checkpoints). A checkpoint whose manifest or data does not check out is left out
        and named in :attr:`refused` and the log.
        """
        found: dict[int, dict[int, Path]] = {}
        self.refused = []
        for step, where in sorted(self._steps()):
            for manifest in sorted(where.glob("*.json")):
                try:
                    units = self._check(manifest, step)
                except FileNotFoundError:
                    continue  # pruned by its writer while we looked: not ours to report
                except JobError as exc:
                    self.refused.append(str(exc))
                    logger.error("%s", exc)
                    continue
                for u in units:
                    found.setdefault(step, {}).setdefault(u, manifest.with_suffix(".safetensors"))
        return found

    def _check(self, manifest: Path, step: int) -> list[int]:
        try:
            if manifest.stat().st_size > _MANIFEST_MAX:  # FileNotFoundError goes to the caller
                raise ValueError("manifest too large")
            meta = json.loads(manifest.read_bytes())
            units = [int(u) for u in meta["units"]]
            ok = meta["format"] == FORMAT and meta["lineage"] == self.lineage and meta["step"] == step
            data = manifest.with_suffix(".safetensors")
            blob = data.read_bytes()
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise JobError(f"checkpoint {manifest} is unreadable, refused: {exc}") from exc
        if not ok:
            raise JobError(f"checkpoint {manifest} belongs to another job or step, refused")
        if len(blob) != meta.get("bytes"):
            raise JobError(f"checkpoint {data} is corrupt or truncated ({len(blob)} bytes, "
                           f"manifest says {meta.get('bytes')}), refused")
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise JobError(f"checkpoint {data} is corrupt or truncated (its {len(blob)} bytes are as many as the manifest "
                           "says, but their sha256 is not the manifest's), refused")
        return units

    def load(self, path: Path, units: Iterable[int]) -> Units:
        """The asked units from the data file ``path`` (checked against its manifest again)."""
        manifest = path.with_suffix(".json")
        step = int(_STEP_DIR.match(path.parent.name).group(1))  # type: ignore[union-attr]
        self._check(manifest, step)
        got_step, held = unpack_units(path.read_bytes(), f"checkpoint {path}")
        want = list(units)
        if got_step != step or any(u not in held for u in want):
            raise JobError(f"checkpoint {path} does not hold units {want} at step {step}")
        return {u: held[u] for u in want}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resume_point(spec: JobSpec, root: str | os.PathLike[str]) -> tuple[JobSpec, int] | None:
    """The job to resume from ``root``: ``spec`` with the global batch of its latest checkpoint there, and its step.

    A job's default global batch follows the member count, so a job restarted on fewer or
    more members names another lineage and would find none of its checkpoints. The latest
    manifest (by time written) whose lineage is ``spec``'s with some global batch decides;
    None when there is none. Manifests are only read, never trusted beyond that match (the
    resume itself checks every file).
    """
    best: tuple[float, int, int] | None = None  # (mtime, global batch, step)
    for mtime, step, meta in _manifests(root):
        with contextlib.suppress(KeyError, TypeError, JobError):
            batch = meta["job"]["global_batch"]
            if not isinstance(batch, int) or batch < 1:
                continue
            same = spec if batch == spec.global_batch else dataclasses.replace(spec, global_batch=batch)
            if same.lineage() == meta["lineage"] and (best is None or (mtime, step) > (best[0], best[2])):
                best = (mtime, batch, step)
    if best is None:
        return None
    return (spec if best[1] == spec.global_batch else dataclasses.replace(spec, global_batch=best[1])), best[2]


def lineage_difference(spec: JobSpec, root: str | os.PathLike[str]) -> tuple[int, dict[str, tuple[Any, Any]]] | None:
    """For a ``--resume`` that found no checkpoint of ``spec``: the latest one in ``root`` of the
    same model, its step, and the fields of what it computes that differ (field: (there, here)).

    A run resumed with another ``--lr`` (say) said only "no checkpoint of this job". None when
    ``root`` holds no checkpoint of that model.
    """
    from p2ptrain.train._job import _NOT_LINEAGE

    here = spec.to_wire()
    best: tuple[float, int, dict[str, Any]] | None = None
    for mtime, step, meta in _manifests(root):
        job = meta.get("job")
        if isinstance(job, dict) and job.get("model") == spec.model and (best is None or (mtime, step) > best[:2]):
            best = (mtime, step, job)
    if best is None:
        return None
    job = best[2]
    diff = {k: (job.get(k), v) for k, v in here.items() if k not in _NOT_LINEAGE and k != "v" and job.get(k) != v}
    return best[1], diff


def _manifests(root: str | os.PathLike[str]) -> Iterator[tuple[float, int, dict[str, Any]]]:
    """(time written, step, manifest) of every readable checkpoint manifest under ``root``,
    read only (never trusted beyond its fields' types; a resume checks every file)."""
    for manifest in Path(root).glob("*/step-*/*.json"):
        meta: Any = None
        with contextlib.suppress(OSError, ValueError):
            stat = manifest.stat()
            if stat.st_size <= _MANIFEST_MAX:
                meta = json.loads(manifest.read_bytes())
        if isinstance(meta, dict) and isinstance(meta.get("step"), int):
            yield stat.st_mtime, meta["step"], meta
