"""p2ptrain: train one PyTorch model on the trusted devices of a LAN, peer to peer.

Package map, bottom layer first (each layer imports only those below it; an import
contract in ``tests/test_architecture.py`` keeps it so):

- ``p2ptrain.kernels``    tensor numerics: compression codecs, error feedback
- ``p2ptrain.transport``  the wire: envelope, validation, async ZeroMQ endpoint, CURVE
- ``p2ptrain.discovery``  mDNS announce/browse, static peers, device resources (no torch)
- ``p2ptrain.ring``       views, leaderless membership, the embeddable :class:`Node`,
                          the mailbox and the ring collectives
- ``p2ptrain.zoo``        workloads: the models and datasets a job trains
- ``p2ptrain.plan``       profiling, the cost model, pipeline and hybrid planners, agreement
- ``p2ptrain.train``      jobs, data order, data-parallel and pipeline trainers
- ``p2ptrain.testbed``    emulated edge devices: namespaces, rate limits, cgroups (root)
- ``p2ptrain.dashboard``  the live web page of the ring (aiohttp, the ``dashboard`` extra)
- ``p2ptrain.bench``, ``p2ptrain.cli``  benchmarks and the command line, on top

Files here: ``_errors.py`` (the error tree, importable from every layer),
``_units.py`` (byte-size parsing), ``_logs.py`` (how ``-v`` becomes log output, for the
command and its benches' member processes) and ``_device.py`` (where a member computes:
CUDA, MPS or the CPU, with the host copy as the master; imports torch, so only the
layers that compute import it).

The names below are imported lazily (PEP 562): ``import p2ptrain.discovery`` or
``import p2ptrain.transport`` loads neither torch nor the node.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from p2ptrain._errors import (
    AdmissionError,
    CodecError,
    ConfigError,
    DiscoveryError,
    JobError,
    JobStopped,
    LeftOutError,
    MembershipError,
    P2PTrainError,
    PeerFailedError,
    PlanError,
    ProtocolError,
    QuorumLostError,
    TransportError,
)

if _typing.TYPE_CHECKING:
    from p2ptrain.dashboard import Dashboard
    from p2ptrain.ring import Collectives, MemberInfo, MemberState, Node, View
    from p2ptrain.train import (
        DataParallelTrainer,
        GlobalSampler,
        JobService,
        JobSpec,
        StepMetrics,
        TrainResult,
        global_batch_indices,
        resolve,
        shard,
        train_single,
        workload_entry,
    )
    from p2ptrain.zoo import ZOO, Workload, build

__version__ = "0.1.0"

# public name -> the subpackage that defines it
_LAZY: dict[str, str] = {
    "Collectives": "p2ptrain.ring",
    "MemberInfo": "p2ptrain.ring",
    "MemberState": "p2ptrain.ring",
    "Node": "p2ptrain.ring",
    "View": "p2ptrain.ring",
    "ZOO": "p2ptrain.zoo",
    "Workload": "p2ptrain.zoo",
    "build": "p2ptrain.zoo",
    "DataParallelTrainer": "p2ptrain.train",
    "GlobalSampler": "p2ptrain.train",
    "JobService": "p2ptrain.train",
    "JobSpec": "p2ptrain.train",
    "StepMetrics": "p2ptrain.train",
    "TrainResult": "p2ptrain.train",
    "global_batch_indices": "p2ptrain.train",
    "resolve": "p2ptrain.train",
    "shard": "p2ptrain.train",
    "train_single": "p2ptrain.train",
    "workload_entry": "p2ptrain.train",
    "Dashboard": "p2ptrain.dashboard",
}


# Subpackages reached as attributes after a bare ``import p2ptrain`` (``p2ptrain.train.
# freeze_startup()`` in the README's prose failed with AttributeError: a walkthrough).
_SUBPACKAGES = frozenset({"dashboard", "discovery", "energy", "kernels", "plan", "ring", "testbed", "train", "transport",
                          "zoo"})


def __getattr__(name: str) -> object:
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"p2ptrain.{name}")  # importing sets the attribute: once
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2ptrain' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBPACKAGES)


__all__ = [
    "ZOO",
    "AdmissionError",
    "CodecError",
    "Collectives",
    "ConfigError",
    "Dashboard",
    "DataParallelTrainer",
    "DiscoveryError",
    "GlobalSampler",
    "JobError",
    "JobStopped",
    "JobService",
    "JobSpec",
    "LeftOutError",
    "MemberInfo",
    "MemberState",
    "MembershipError",
    "Node",
    "P2PTrainError",
    "PeerFailedError",
    "PlanError",
    "ProtocolError",
    "QuorumLostError",
    "StepMetrics",
    "TrainResult",
    "TransportError",
    "View",
    "Workload",
    "__version__",
    "build",
    "global_batch_indices",
    "resolve",
    "shard",
    "train_single",
    "workload_entry",
]
