"""p2ptrain: train one PyTorch model on the trusted devices of a LAN, peer to peer.

Package map:

- ``p2ptrain.kernels``   tensor numerics: compression codecs, error feedback
- ``p2ptrain.transport`` the wire: envelope, validation, async ZeroMQ endpoint, CURVE
- ``p2ptrain.discovery`` mDNS announce/browse, static peers, device resources
- ``p2ptrain`` itself    the errors, the membership ring, the embeddable ``Node``, the CLI

Files here:

- ``_errors.py``        the error tree
- ``_view.py``          ``View``: members in ring order at an epoch
- ``_membership.py``    the leaderless agreement state machine (no sockets)
- ``_identity.py``      persisted node ids, cluster secrets
- ``_node.py``          ``Node``: transport + discovery + membership on the host's loop
- ``_mailbox.py``       keyed delivery of collective messages
- ``_collectives.py``   ring all-reduce / all-gather / broadcast / barrier
- ``_data.py``          deterministic sample order and shards
- ``_zoo.py``           built-in workloads (tinygpt, mlp)
- ``_job.py``           ``JobSpec``, entry-point resolution, single-process reference
- ``_jobs.py``          ``JobService``: leaderless job offer/accept
- ``_dataparallel.py``  data-parallel trainer
- ``_testbed*.py``      the emulated edge testbed (namespaces, tc, cgroups)
- ``_cli.py``, ``_cmd_*.py``, ``_bench_*.py``  the command line, one file per command
"""

from __future__ import annotations

from p2ptrain._errors import (
    AdmissionError,
    CodecError,
    ConfigError,
    DiscoveryError,
    JobError,
    MembershipError,
    P2PTrainError,
    PeerFailedError,
    PlanError,
    ProtocolError,
    QuorumLostError,
    TransportError,
)

from p2ptrain._collectives import Collectives
from p2ptrain._data import GlobalSampler, global_batch_indices, shard
from p2ptrain._dataparallel import DataParallelTrainer, StepMetrics, TrainResult
from p2ptrain._job import JobSpec, resolve, train_single, workload_entry
from p2ptrain._jobs import JobService
from p2ptrain._membership import MemberState
from p2ptrain._node import MemberInfo, Node
from p2ptrain._view import View
from p2ptrain._zoo import ZOO, Workload, build

__version__ = "0.1.0"

__all__ = [
    "ZOO",
    "AdmissionError",
    "Collectives",
    "DataParallelTrainer",
    "GlobalSampler",
    "JobService",
    "JobSpec",
    "MemberInfo",
    "MemberState",
    "Node",
    "StepMetrics",
    "TrainResult",
    "View",
    "Workload",
    "build",
    "global_batch_indices",
    "resolve",
    "shard",
    "train_single",
    "workload_entry",
    "CodecError",
    "ConfigError",
    "DiscoveryError",
    "JobError",
    "MembershipError",
    "P2PTrainError",
    "PeerFailedError",
    "PlanError",
    "ProtocolError",
    "QuorumLostError",
    "TransportError",
    "__version__",
]
