"""p2ptrain: train one PyTorch model on the trusted devices of a LAN, peer to peer.

Package map:

- ``p2ptrain.kernels``   tensor numerics: compression codecs, error feedback
- ``p2ptrain.transport`` the wire: envelope, validation, async ZeroMQ endpoint, CURVE
- ``p2ptrain.discovery`` mDNS announce/browse, static peers, device resources
- ``p2ptrain`` itself    the errors, the membership ring, the embeddable ``Node``, the CLI

Files here: ``_errors.py`` (error tree), ``_cli.py`` (command line), ``_cmd_*.py``
(one subcommand each), ``_bench_*.py`` (one benchmark each).
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

__version__ = "0.1.0"

__all__ = [
    "AdmissionError",
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
