"""A member's training state as bytes: parameters, optimizer state and the step, no pickle.

Recovery hands state between members, replicas and handovers keep copies elsewhere, and
checkpoints write it to disk; all use one format: a safetensors blob (a JSON header with
names, dtypes and shapes, then raw little-endian bytes; parsing it runs no code) of
*units* (below), the step in its metadata.

Loading checks every name, shape and dtype against the live model before it copies
anything, so a blob from another model is refused whole, never applied half-way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from p2ptrain._errors import JobError
from p2ptrain.train._blob import BlobError, read_blob, write_blob

__all__ = ["Units", "apply", "capture", "check_fits", "pack_units", "pack_units_tensor", "unpack_units", "unpack_units_tensor"]

_OPT_KEY = re.compile(r"^o\.(\d{1,6})\.([A-Za-z_][A-Za-z0-9_]{0,63})$")


# --- named units: pieces of the state that can be moved and re-cut ------------------------
#
# Pipeline recovery, replicas and checkpoints move the state by *unit*: a layer of a
# pipeline model (its index), or the whole model (unit 0) for data parallelism. A unit's
# tensors are named by the parameter's name inside the unit, so they do not depend on
# which stage held the layer: ``p/<name>`` for a parameter, ``o/<name>/<key>`` for its
# optimizer state. A blob of several units prefixes each with ``<unit>:``.

Units = dict[int, dict[str, torch.Tensor]]
_UNIT_KEY = re.compile(r"^(\d{1,6}):([po])/([A-Za-z0-9_.]{1,200})(?:/([A-Za-z_][A-Za-z0-9_]{0,63}))?$")


def capture(named: Sequence[tuple[str, torch.Tensor]], opt: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """A copy of ``named`` parameters and their optimizer state (call it on the compute thread)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in named:
        out[f"p/{name}"] = p.detach().clone()
        state = opt.state.get(p, {}) if opt is not None else {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"o/{name}/{key}"] = value.detach().clone()
            elif isinstance(value, (int, float)):
                out[f"o/{name}/{key}"] = torch.tensor(value, dtype=torch.float64)
    return out


def check_fits(tensors: dict[str, torch.Tensor], named: Sequence[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise :class:`JobError` unless ``tensors`` holds every parameter of ``named`` with its shape and dtype."""
    for name, p in named:
        got = tensors.get(f"p/{name}")
        if got is None or got.shape != p.shape or got.dtype != p.dtype:
            have = "missing" if got is None else f"{tuple(got.shape)} {got.dtype}"
            raise JobError(f"{what}: parameter {name!r} is {have}, the model has {tuple(p.shape)} {p.dtype}")
    known = {f"p/{n}" for n, _ in named}
    prefixes = tuple(f"o/{n}/" for n, _ in named)
    for key in tensors:
        if key not in known and not key.startswith(prefixes):
            raise JobError(f"{what}: holds {key!r}, which the model does not have")


def apply(tensors: dict[str, torch.Tensor], named: Sequence[tuple[str, torch.Tensor]], opt: torch.optim.Optimizer | None,
          what: str = "training state") -> None:
    """Copy ``tensors`` (from :func:`capture`) into the parameters and the optimizer.

    Raises:
        JobError: they do not fit (nothing was changed).
    """
    check_fits(tensors, named, what)
    with torch.no_grad():
        for name, p in named:
            p.copy_(tensors[f"p/{name}"])
            p.grad = None
            if opt is not None:
                prefix = f"o/{name}/"
                state = {k[len(prefix):]: t.clone() for k, t in tensors.items() if k.startswith(prefix)}
                if state:
                    opt.state[p] = state
                else:
                    opt.state.pop(p, None)


def pack_units_tensor(units: Units, step: int) -> torch.Tensor:
    """Units at ``step`` as one safetensors blob in a flat uint8 tensor to send (the step in
    its metadata). Every tensor is copied into it once: call it off the event loop (``_blob``)."""
    flat = {f"{u}:{key}": t for u, entries in units.items() for key, t in entries.items()}
    return write_blob(flat, {"step": str(step), "units": ",".join(str(u) for u in sorted(units))})


def pack_units(units: Units, step: int) -> bytes:
    """:func:`pack_units_tensor` as ``bytes`` (a checkpoint file's contents)."""
    return pack_units_tensor(units, step).numpy().tobytes()


def unpack_units(blob: bytes, what: str = "training state") -> tuple[int, Units]:
    """Read a blob from :func:`pack_units`: ``(step, units)`` (see :func:`unpack_units_tensor`)."""
    return unpack_units_tensor(torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else None, what)


def unpack_units_tensor(wire: torch.Tensor | None, what: str = "training state") -> tuple[int, Units]:
    """Read a received :func:`pack_units_tensor` blob (None: nothing was sent): ``(step, units)``.

    The tensors are copies (``wire`` may be reused); call it off the event loop.

    Raises:
        JobError: it is corrupt, truncated, or holds an entry of the wrong form.
    """
    size = 0 if wire is None else wire.numel()
    try:
        tensors, meta = read_blob(wire if wire is not None else torch.empty(0, dtype=torch.uint8))
    except BlobError as exc:
        raise JobError(f"{what} is corrupt or truncated ({size} bytes): {exc}") from exc
    step, listed = meta.get("step", ""), meta.get("units", "")
    if not (isinstance(step, str) and step.isdigit() and isinstance(listed, str)):
        raise JobError(f"{what} has no valid step in its metadata")
    units: Units = {int(u): {} for u in listed.split(",") if u.isdigit()}
    for name, t in tensors.items():
        m = _UNIT_KEY.match(name)
        if m is None or int(m.group(1)) not in units:
            raise JobError(f"{what} holds an entry of unknown form: {name!r}")
        units[int(m.group(1))][name.split(":", 1)[1]] = t
    return int(step), units
