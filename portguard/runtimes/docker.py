"""Docker's networks as pure values: what each one asks of source NAT on this host.

Only ``bridge`` networks are translated on this host by Docker (its ``-s SUBNET ! -o BRIDGE -j
MASQUERADE``), so only they get rules of their own:

* ``host``/``none`` have no subnet: host traffic is covered by portguard's host rule;
* ``macvlan``/``ipvlan`` frames leave through the parent interface below the host's IP stack:
  no postrouting NAT happens on this host for them;
* ``overlay`` (Swarm) egress leaves through ``docker_gwbridge``, itself a bridge network.

Options read (as dockerd 20.10-28 name them): ``com.docker.network.bridge.enable_ip_masquerade``
(false: Docker does not masquerade), ``com.docker.network.host_ipv4``/``host_ipv6`` (Docker
SNATs to that address), ``com.docker.network.bridge.gateway_mode_ipv4``/``_ipv6`` = ``routed``
(no NAT), ``com.docker.network.bridge.name``; ``Internal`` networks have no way out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DockerNetwork", "parse_networks"]

_OPT = "com.docker.network."
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class DockerNetwork:
    name: str
    id: str
    bridge: str  # the Linux bridge its containers sit on
    subnets: tuple[str, ...]  # canonical CIDRs, IPv4 and IPv6
    masquerade: bool  # Docker masquerades it (else its containers keep their address)
    host_ipv4: str | None = None  # Docker SNATs IPv4 traffic to this address
    host_ipv6: str | None = None
    routed_ipv4: bool = False  # gateway mode "routed": no NAT for this family
    routed_ipv6: bool = False

    def nat_address(self, version: int) -> str | None:
        return self.host_ipv4 if version == 4 else self.host_ipv6

    def routed(self, version: int) -> bool:
        return self.routed_ipv4 if version == 4 else self.routed_ipv6


def _address(raw: object, version: int) -> str | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        addr = ipaddress.ip_address(raw)
    except ValueError:
        return None
    return str(addr) if addr.version == version and not addr.is_unspecified else None


def _subnets(ipam: object) -> tuple[str, ...]:
    configs = ipam.get("Config") if isinstance(ipam, Mapping) else None
    out: list[str] = []
    for entry in configs if isinstance(configs, list) else []:
        subnet = entry.get("Subnet") if isinstance(entry, Mapping) else None
        try:
            out.append(str(ipaddress.ip_network(str(subnet), strict=False)))
        except ValueError:
            continue
    return tuple(dict.fromkeys(out))


def parse_networks(raw: Iterable[Mapping[str, Any]]) -> tuple[DockerNetwork, ...]:
    """Bridge networks with a way out, from the Engine API's ``GET /networks`` list, sorted by name.

    Anything malformed is skipped rather than guessed at; rules are only derived from values
    that parse as addresses and subnets.
    """
    networks = []
    for net in raw:
        if not isinstance(net, Mapping) or net.get("Driver") != "bridge" or net.get("Internal"):
            continue
        name, net_id = str(net.get("Name") or ""), str(net.get("Id") or "")
        raw_options = net.get("Options")
        options: Mapping[str, Any] = raw_options if isinstance(raw_options, Mapping) else {}
        subnets = _subnets(net.get("IPAM"))
        if not name or not net_id or not subnets:
            continue
        masq = str(options.get(_OPT + "bridge.enable_ip_masquerade", "true")).lower() in _TRUE
        bridge = str(options.get(_OPT + "bridge.name") or ("docker0" if name == "bridge" else f"br-{net_id[:12]}"))
        networks.append(
            DockerNetwork(
                name=name,
                id=net_id,
                bridge=bridge,
                subnets=subnets,
                masquerade=masq,
                host_ipv4=_address(options.get(_OPT + "host_ipv4"), 4),
                host_ipv6=_address(options.get(_OPT + "host_ipv6"), 6),
                routed_ipv4=str(options.get(_OPT + "bridge.gateway_mode_ipv4", "")).startswith("routed"),
                routed_ipv6=str(options.get(_OPT + "bridge.gateway_mode_ipv6", "")).startswith("routed"),
            )
        )
    return tuple(sorted(networks, key=lambda n: (n.name, n.id)))
