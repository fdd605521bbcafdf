"""p2ptrain.transport: the wire (installed as ``p2ptrain.transport``).

A message is a ZeroMQ multipart: a msgpack envelope, then each tensor buffer as raw
frames of at most 1 MiB. No pickle; every inbound frame is validated against
:class:`Limits` before use; bad messages are dropped and counted per peer and reason.

- ``_envelope.py``  the envelope: ``PROTOCOL_VERSION``, ``Limits``, ``Message``,
  ``Envelope``/``TensorHeader``, ``decode_envelope`` and the validation rules
- ``_frames.py``    framing: ``encode_message`` (zero-copy chunks), ``decode_message``,
  receiving buffers in place from any frame source
- ``_codecs.py``    codec lookup (``p2ptrain.kernels.get_codec``, lossless fallback)
- ``_bufpool.py``   recycled receive buffers (warm pages, bounded)
- ``_landing.py``   receive into the destination: ``expect``-ed tensors added or copied
  straight from ZeroMQ's frames into the caller's tensor, off the event loop
- ``_deferred.py``  messages over 4 MiB: frames taken on the loop, checked, copied and
  decoded in the codec thread
- ``_heap.py``      ``keep_heap_warm``: glibc settings an entry point may apply so freed
  receive memory is reused instead of faulted in again
- ``_stats.py``     ``PeerStats``: per-peer counters, rate-limited drop log
- ``_curve.py``     ``CurveKeys`` (cluster keypair from a secret), admission policies
- ``_zap.py``       the ZAP responder that asks ``admit(ip, key)`` per connection
- ``_zerocopy.py``  knowing when libzmq has released memory sent without a copy
- ``_base.py``      ``BaseEndpoint``: the API shared by real and fake endpoints
- ``_inbox.py``     the bounded queue between a reader and ``recv`` (back-pressure)
- ``_sockets.py``   the sockets under ``Endpoint``: bind address, ROUTER, per-peer DEALERs,
  the handshake-failure monitor
- ``_pulse.py``     the pulse thread: repeats the last heartbeat while the event loop is
  blocked, with its own sockets, for a bounded time
- ``_endpoint.py``  ``Endpoint``: ROUTER in, one DEALER per peer out, CURVE, back-pressure
- ``_fake.py``      ``FakeNetwork``/``FakeEndpoint``/``Fault``: in memory, fault injection
"""

from __future__ import annotations

from p2ptrain.transport._base import BaseEndpoint
from p2ptrain.transport._curve import CurveKeys, admit_any, admit_cluster_key, admit_loopback
from p2ptrain.transport._endpoint import Endpoint
from p2ptrain.transport._envelope import PROTOCOL_VERSION, Envelope, Limits, Message, TensorHeader, decode_envelope
from p2ptrain.transport._fake import FakeEndpoint, FakeNetwork, Fault
from p2ptrain.transport._frames import decode_message, encode_message
from p2ptrain.transport._heap import keep_heap_warm
from p2ptrain.transport._landing import INLINE_BYTES
from p2ptrain.transport._pulse import PulseStats
from p2ptrain.transport._stats import PeerStats

__all__ = [
    "INLINE_BYTES",
    "PROTOCOL_VERSION",
    "BaseEndpoint",
    "CurveKeys",
    "Endpoint",
    "Envelope",
    "FakeEndpoint",
    "FakeNetwork",
    "Fault",
    "Limits",
    "Message",
    "PeerStats",
    "PulseStats",
    "TensorHeader",
    "admit_any",
    "admit_cluster_key",
    "admit_loopback",
    "decode_envelope",
    "decode_message",
    "encode_message",
    "keep_heap_warm",
]
