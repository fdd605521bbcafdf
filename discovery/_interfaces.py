"""Interface choice: which network interfaces mDNS runs on, and which addresses a node announces.

``None`` means every interface (real devices on a LAN); a list names interfaces by IP
address (``--interface 192.168.1.20``) or by name (``--interface wlan0``). A node announces
the addresses of exactly the interfaces it runs on, so a peer never learns an address it
cannot reach (a loopback address sent to the LAN would make a peer dial itself).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging

import ifaddr
from zeroconf import InterfaceChoice, IPVersion

from p2ptrain._errors import ConfigError

from ._records import MAX_ADDRESSES

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InterfacePlan:
    """What to hand zeroconf, and what to announce.

    Attributes:
        zeroconf_interfaces: ``InterfaceChoice.All`` or a list of addresses for zeroconf.
        ip_version: Which IP versions zeroconf serves.
        announce: Addresses to put in this node's A/AAAA records.
    """

    zeroconf_interfaces: InterfaceChoice | list[str]
    ip_version: IPVersion
    announce: tuple[str, ...]


def plan_interfaces(interfaces: list[str] | None) -> InterfacePlan:
    """Resolve the user's interface choice against this host's interfaces.

    Args:
        interfaces: ``None`` for all interfaces, else IP addresses or interface names.

    Returns:
        The plan.

    Raises:
        ConfigError: An entry is neither an address of this host nor an interface name.
    """
    adapters = list(ifaddr.get_adapters())
    if interfaces is None:
        # mDNS over IPv4 on every interface (zeroconf's default; IPv6 mDNS on all
        # interfaces doubles the traffic for no reach a LAN of devices needs).
        found = [
            ip.ip
            for adapter in adapters
            for ip in adapter.ips
            if isinstance(ip.ip, str) and not ipaddress.IPv4Address(ip.ip).is_loopback
        ]
        if not found:
            log.warning("no non-loopback IPv4 address found; announcing 127.0.0.1 only")
            found = ["127.0.0.1"]
        # A host with many interfaces (bridges, containers) announces its first few.
        return InterfacePlan(
            InterfaceChoice.All, IPVersion.V4Only, tuple(dict.fromkeys(found))[:MAX_ADDRESSES]
        )
    if isinstance(interfaces, str) or not interfaces:
        raise ConfigError(
            f"interfaces must be None (all) or a non-empty list of addresses, got {interfaces!r}"
        )
    host_v4 = {ip.ip for a in adapters for ip in a.ips if isinstance(ip.ip, str)}
    host_v6 = {ip.ip[0] for a in adapters for ip in a.ips if isinstance(ip.ip, tuple)}
    chosen: list[str] = []
    for entry in interfaces:
        try:
            addr = ipaddress.ip_address(entry)
        except ValueError:
            chosen.extend(_addresses_of_adapter(entry, adapters))
            continue
        if addr.version == 6 and addr.is_loopback:
            raise ConfigError("mDNS cannot run on ::1 (no multicast on IPv6 loopback); use 127.0.0.1")
        bare = str(addr).split("%", 1)[0]  # zeroconf finds an IPv6 address's interface itself
        if bare not in host_v4 | host_v6:
            raise ConfigError(
                f"interface address {entry!r} is not on this host; choose one of {sorted(host_v4 | host_v6)}"
            )
        chosen.append(bare)
    announce = _dedup(chosen)
    versions = {ipaddress.ip_address(a).version for a in announce}
    ip_version = (
        IPVersion.All if versions == {4, 6} else IPVersion.V6Only if versions == {6} else IPVersion.V4Only
    )
    zeroconf_interfaces: list[str] = list(announce)
    return InterfacePlan(zeroconf_interfaces, ip_version, announce)


def interface_addresses(entries: list[str]) -> list[str]:
    """``entries`` with every interface name (``wlan0``, ``lo``) replaced by its IPv4 addresses.

    Addresses pass through unchecked (:func:`plan_interfaces` checks them against the host);
    a node binds its socket to what this returns, and a socket binds to addresses only.

    Raises:
        ConfigError: A name that is not an interface of this host, or one without IPv4.
    """
    adapters: list[ifaddr.Adapter] | None = None
    out: list[str] = []
    for entry in entries:
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            adapters = list(ifaddr.get_adapters()) if adapters is None else adapters
            out.extend(_addresses_of_adapter(entry, adapters))
            continue
        out.append(entry)
    return list(dict.fromkeys(out))


def _addresses_of_adapter(name: str, adapters: list[ifaddr.Adapter]) -> list[str]:
    for adapter in adapters:
        if adapter.nice_name == name or adapter.name == name:
            # IPv4 only from a named interface: IPv6 link-local needs a scope zeroconf
            # handles by index, and IPv4 mDNS reaches every device on the link anyway.
            v4 = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
            if not v4:
                raise ConfigError(f"interface {name!r} has no IPv4 address; name an address instead")
            return v4
    names = sorted({a.nice_name for a in adapters})
    raise ConfigError(f"{name!r} is neither an IP address nor an interface of this host ({names})")


def _dedup(addresses: list[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(addresses))
    if len(out) > MAX_ADDRESSES:
        raise ConfigError(f"{len(out)} addresses chosen; at most {MAX_ADDRESSES} can be announced")
    return out
