"""p2ptrain.discovery: finding peers (installed as ``p2ptrain.discovery``).

Nodes of a cluster find each other with mDNS / DNS-SD (service ``_p2ptrain._tcp.local.``,
python-zeroconf's asyncio API), or are named by hand where multicast does not pass.
This package knows neither the transport nor the kernels.

Files:

- ``_mdns.py``       :class:`MdnsDiscovery`: announce this node, browse the cluster's peers
  (zeroconf adapter; the timing choices behind fast convergence are in its docstring)
- ``_table.py``      ``PeerTable``: the socket-free state machine behind ``peers()`` (cluster
  filter, incarnations, capacity, counters)
- ``_events.py``     :class:`PeerEvent` and :class:`PeerEventStream` (bounded, merging)
- ``_records.py``    :class:`PeerRecord`, the TXT schema and its strict decoder,
  :data:`SERVICE_TYPE`, :data:`PROTOCOL_VERSION`
- ``_resources.py``  :class:`Resources` and :func:`probe_resources` (cores, memory,
  accelerator, matmul GFLOP/s, battery); :func:`cpu_quota`
- ``_interfaces.py`` interface choice: zeroconf interfaces and the addresses announced
- ``_static.py``     :class:`StaticPeer`: ``--peer HOST:PORT`` parsing
- ``_bench.py``      :func:`measure_convergence` and its plain-zeroconf baseline
"""

from __future__ import annotations

from ._bench import measure_convergence, measure_convergence_baseline
from ._events import PeerEvent, PeerEventStream
from ._interfaces import interface_addresses
from ._mdns import MdnsDiscovery
from ._records import PROTOCOL_VERSION, SERVICE_TYPE, PeerRecord, check_cluster
from ._resources import Resources, affinity_cores, available_memory, cpu_quota, probe_resources
from ._static import StaticPeer

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "MdnsDiscovery",
    "PeerEvent",
    "PeerEventStream",
    "PeerRecord",
    "Resources",
    "StaticPeer",
    "affinity_cores",
    "check_cluster",
    "available_memory",
    "cpu_quota",
    "interface_addresses",
    "measure_convergence",
    "measure_convergence_baseline",
    "probe_resources",
]
