"""What portguard wants in the kernel: a pure function of the config and Docker's networks.

Per address family, in chain order:

1. exclusions by egress interface (``lo``, ``docker0``, ``br-+`` and each network's own bridge:
   Docker never translates traffic that stays on a network's bridge, ``! -o BRIDGE``);
2. exclusions by destination (``egress.exclude_destinations``);
3. per protocol (and per egress interface when scoped):
   a. host traffic (source address is one of this host's own): port-only SNAT, the address stays;
   b. each Docker network Docker does *not* masquerade the default way: SNAT to its
      ``host_ipv4``/``host_ipv6`` address, or port-only when Docker does not NAT it at all;
   c. everything else that is forwarded: MASQUERADE, as Docker's own rule would, port moved.

Networks Docker masquerades the default way need no rule of their own: (c) does exactly what
Docker's MASQUERADE would, with the port moved into ``to_ports``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import replace

from portguard.config import Config, iface_matches, validate_interface
from portguard.errors import ConfigError
from portguard.networks import DockerNetwork
from portguard.rules import Action, Family, Rule

__all__ = ["desired_rules", "skipped_networks"]


def _version(family: Family) -> int:
    return 4 if family is Family.IPV4 else 6


def _bridge_ok(name: str) -> bool:
    try:
        validate_interface(name, "bridge")
    except ConfigError:
        return False
    return True


def skipped_networks(networks: Sequence[DockerNetwork]) -> list[str]:
    """Networks whose bridge name no backend can represent identically: they get no rules (logged)."""
    return [n.name for n in networks if not _bridge_ok(n.bridge)]


def _network_rules(family: Family, networks: Sequence[DockerNetwork]) -> list[tuple[str, str | None]]:
    """(subnet, SNAT address or None for port-only) for each network that differs from plain masquerade."""
    version = _version(family)
    out: list[tuple[str, str | None]] = []
    for net in networks:
        if not _bridge_ok(net.bridge):
            continue
        for subnet in net.subnets:
            if ipaddress.ip_network(subnet).version != version:
                continue
            address = net.nat_address(version)
            if not net.masquerade or net.routed(version):
                out.append((subnet, None))
            elif address:
                out.append((subnet, address))
    return out


def desired_rules(
    cfg: Config,
    networks: Sequence[DockerNetwork] = (),
    families: Sequence[Family] | None = None,
) -> tuple[Rule, ...]:
    """The ordered entries of portguard's chain for ``families`` (default: the configured ones)."""
    rules: list[Rule] = []
    for family in families if families is not None else cfg.families:
        excluded = list(cfg.egress_exclude_interfaces)
        for net in networks:
            if _bridge_ok(net.bridge) and not any(iface_matches(p, net.bridge) for p in excluded):
                excluded.append(net.bridge)
        rules.extend(Rule(family, Action.RETURN, out_interface=name, label="exclude") for name in excluded)
        rules.extend(
            Rule(family, Action.RETURN, destination=cidr, label="exclude")
            for cidr in cfg.egress_exclude_destinations
            if ipaddress.ip_network(cidr).version == _version(family)
        )
        special = _network_rules(family, networks)
        names = {s: n.name for n in networks for s in n.subnets}
        for out in cfg.egress_interfaces or (None,):
            for proto in cfg.protocols:
                forwarded = Rule(family, Action.MASQUERADE, out_interface=out, protocol=proto, sport=cfg.source_ports,
                                 to_ports=cfg.to_ports, fully_random=cfg.fully_random, label="forwarded")
                rules.append(replace(forwarded, action=Action.SNAT, local_source=True, label="host"))
                rules.extend(
                    replace(forwarded, action=Action.SNAT, source=net, to_address=address, label=f"net:{names[net]}")
                    for net, address in special
                )
                rules.append(forwarded)
    return tuple(rules)
