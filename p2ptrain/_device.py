"""Where a member computes: CUDA, MPS or the CPU, and the copies that cross between.

A member with an accelerator runs its share of a job there. It keeps the *host copy*
of its layers on the CPU: the master weights, their gradients and the optimizer. The
*device copy* of those layers does the forward and backward passes. So:

- every state format (snapshots, replicas, checkpoints, weights back) reads and writes
  the host copy, unchanged for a GPU member;
- every replica's optimizer runs on a CPU, so a data-parallel group that mixes CUDA
  and CPU members still ends each step bit-identical (a CUDA Adam and a CPU Adam round
  differently in the last bit, and the replicas would drift apart);
- what crosses the network is always a host tensor: activations and gradients move to
  the device when they arrive and back to the host before they leave, at the stage
  boundary, and gradient buckets are packed from the device straight into host
  buffers.

This is the offload layout of ZeRO-Offload (Ren et al., 2021: optimizer state and
update on the CPU, forward and backward on the GPU), which also fits the small
accelerators of the edge: a Jetson's GPU shares its memory with the CPU, and Adam's
two moments never take GPU memory. The cost is one host-to-device copy of the
parameters and one device-to-host copy of the gradients per step.

:class:`Placement` holds the pairs of (host, device) parameters and does the copies;
on a CPU member (the usual case) the device copy *is* the host copy and every call is
free. ``Placement(device, offload=True)`` keeps a separate copy even on the CPU, so the
CPU-only test suite runs the very code path of a GPU member.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from p2ptrain._errors import ConfigError

__all__ = ["DEVICES", "HOST", "Placement", "accelerator_name", "first_on", "pick_device", "synchronize"]

logger = logging.getLogger(__name__)

# What ``--device`` accepts: a kind, optionally with an index (``cuda:1``).
DEVICES = ("auto", "cpu", "cuda", "mps")
HOST = torch.device("cpu")

T = TypeVar("T")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(spec: str | torch.device = "auto") -> torch.device:
    """The device a member trains on.

    Args:
        spec: ``"auto"`` (CUDA when torch sees one, else Apple's MPS, else the CPU),
            ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, or a ``torch.device``.

    Raises:
        ConfigError: the spec is malformed, or names a device this machine's torch
            cannot use (the message says what it can).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ConfigError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', not {type(spec).__name__}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else HOST
    kind, _, index = spec.partition(":")
    if kind not in DEVICES[1:] or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {spec!r}: this torch ({torch.__version__}) sees no CUDA device; "
                              "use --device cpu, or install a CUDA build of torch")
        i = int(index) if index else torch.cuda.current_device()
        if i >= n:
            raise ConfigError(f"device {spec!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
        return torch.device("cuda", i)
    if kind == "mps" and not _mps_available():
        raise ConfigError("device 'mps': this torch sees no Apple MPS device; use --device cpu")
    return torch.device(kind)


def accelerator_name(device: torch.device) -> str:
    """A human name for ``device`` (``"cpu"``, ``"cuda:0 (NVIDIA H200)"``, ``"mps"``)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (accelerators run asynchronously; times need this)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Placement:
    """One member's layers on its compute device, with their host copy as the master.

    Args:
        device: where forward and backward run (see :func:`pick_device`).
        offload: keep a separate device copy even when ``device`` is the CPU (tests use
            it to run a GPU member's code path on a CPU-only machine).
    """

    def __init__(self, device: torch.device | str = HOST, *, offload: bool = False) -> None:
        self.device = torch.device(device)
        self.separate = offload or self.device != HOST
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def module(self, host: nn.Module) -> nn.Module:
        """The device copy of ``host`` (``host`` itself on a CPU member); its parameters are paired.

        Buffers (e.g. BatchNorm statistics) live on the device copy from now on.
        """
        if not self.separate:
            return host
        dev = copy.deepcopy(host).to(self.device)
        self._pairs.extend((h, d) for h, d in zip(host.parameters(), dev.parameters()) if h.requires_grad)
        return dev

    def push(self) -> None:
        """Copy every host parameter to its device copy and clear the device gradients.

        Call before a step's first forward (the optimizer, a restore or a recovery moved
        the host copy); compute thread.
        """
        with torch.no_grad():
            for h, d in self._pairs:
                d.copy_(h, non_blocking=True)
                d.grad = None

    def pull(self) -> None:
        """Copy every device gradient into its host parameter's gradient (compute thread)."""
        for h, d in self._pairs:
            if d.grad is None:
                continue
            if h.grad is None:
                h.grad = d.grad.to(HOST)
            else:
                h.grad.copy_(d.grad)
            d.grad = None

    def to_device(self, x: T) -> T:
        """``x`` (a tensor, or tuples, lists and dicts of them) on the compute device."""
        return _move(x, self.device) if self.separate else x

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the host, ready to send."""
        return t.to(HOST) if self.separate else t

    def twins(self, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The device copies of ``params`` (host parameters of :meth:`module`), in order."""
        if not self.separate:
            return list(params)
        of = {id(h): d for h, d in self._pairs}
        return [of[id(p)] for p in params]

    def sync(self) -> None:
        """Wait for the device (before reading a clock)."""
        synchronize(self.device)


def _move(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, tuple):
        return type(x)(*(_move(v, device) for v in x)) if hasattr(x, "_fields") else tuple(_move(v, device) for v in x)
    if isinstance(x, list):
        return [_move(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x



# (job id, accelerator) -> the first member of this process that took the job there; the
# newest 256 kept (job ids are unique, so an old entry never decides anything again).
_FIRST_ON: OrderedDict[tuple[str, torch.device], str] = OrderedDict()


def first_on(job_id: str, device: torch.device, node_id: str) -> str:
    """The first member of this process that took job ``job_id`` on ``device``: ``node_id`` if none did before.

    PyTorch's autograd engine runs every backward pass on an accelerator in one thread
    per device and process. Where a member's backward waits for the other members inside
    it (tensor and sequence parallelism exchange gradients mid-backward), two members of
    one process on one device would each wait for the other forever: the second refuses.
    """
    key = (job_id, device)
    first = _FIRST_ON.setdefault(key, node_id)
    _FIRST_ON.move_to_end(key)
    while len(_FIRST_ON) > 256:
        _FIRST_ON.popitem(last=False)
    return first
