"""What portguard wants in the kernel: a pure function of the config and the runtimes' inventory.

Per address family, two chains.  The **early** chain runs before every other source NAT on the host and holds,
in order:

1. exclusions by egress interface (``lo``, ``docker0``, ``br-+`` and every runtime's own bridge: no runtime
   translates traffic that stays on its bridge, and a host talking to its containers keeps its port);
2. exclusions by destination (``egress.exclude_destinations``: untouched, port included);
3. per protocol (and per egress interface when scoped):
   a. packets a runtime masquerades by firewall mark (kube-proxy's ``0x4000/0x4000``): masquerade, port moved;
   b. host traffic (its source address is one of this host's own): port-only SNAT, the address stays;
4. each translating network's own exceptions (from its subnet to destinations its runtime leaves alone:
   its subnet, multicast, a cluster CIDR), which return to the rest of the host's NAT;
5. per protocol (and scope), each network its runtime masquerades or SNATs: the same translation, port moved.

The **late** chain runs after every other source NAT, so it only sees connections that nobody on the host
translated (the kernel stops at the first NAT binding): the same exclusions, then a port-only SNAT.  Forwarded
traffic nothing translates (a routed LAN, pod to pod, a network its runtime does not NAT) keeps its address and
gets its port moved; traffic another program translates in a way portguard does not know keeps that program's
translation (doctor names it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import replace

from portguard.config import Config, iface_matches
from portguard.inventory import Inventory, Network
from portguard.rules import Action, Family, Rule

__all__ = ["configured_networks", "desired_rules"]


def _version(family: Family) -> int:
    return 4 if family is Family.IPV4 else 6


def _in_family(cidr: str, family: Family) -> bool:
    return ipaddress.ip_network(cidr).version == _version(family)


def configured_networks(cfg: Config) -> tuple[Network, ...]:
    """The operator's ``[masquerade]`` section as a network of the ``config`` runtime (ip-masq-agent style)."""
    if not cfg.masquerade_sources:
        return ()
    return (Network("config", "masquerade", "", cfg.masquerade_sources, True,
                    keep_destinations=cfg.masquerade_keep_destinations),)


def _exclusions(family: Family, cfg: Config, networks: Sequence[Network], *, late: bool) -> list[Rule]:
    interfaces = list(cfg.egress_exclude_interfaces)
    for net in networks:
        if net.bridge and not any(iface_matches(p, net.bridge) for p in interfaces):
            interfaces.append(net.bridge)
    rules = [Rule(family, Action.RETURN, out_interface=name, late=late, label="exclude") for name in interfaces]
    rules += [Rule(family, Action.RETURN, destination=cidr, late=late, label="exclude")
              for cidr in cfg.egress_exclude_destinations if _in_family(cidr, family)]
    return rules


def _family_rules(family: Family, cfg: Config, inventory: Inventory) -> list[Rule]:
    networks = (*inventory.networks, *configured_networks(cfg))
    version = _version(family)
    translating = [n for n in networks if n.translates(version)]
    early = _exclusions(family, cfg, networks, late=False)
    late = _exclusions(family, cfg, networks, late=True)
    scopes = cfg.egress_interfaces or (None,)
    base = [Rule(family, Action.SNAT, out_interface=out, protocol=proto, sport=cfg.source_ports, to_ports=cfg.to_ports,
                 fully_random=cfg.fully_random) for out in scopes for proto in cfg.protocols]
    early += [replace(r, action=Action.MASQUERADE, fwmark=mark, label=runtime) for r in base
              for runtime, mark in inventory.marks]
    early += [replace(r, local_source=True, label="host") for r in base]
    for net in translating:
        early += [Rule(family, Action.RETURN, source=subnet, destination=keep, label=net.label)
                  for subnet in net.subnets if _in_family(subnet, family)
                  for keep in net.keep_destinations if _in_family(keep, family)]
    for rule in base:
        for net in translating:
            address = net.nat_address(version)
            early += [replace(rule, action=Action.SNAT if address else Action.MASQUERADE, source=subnet,
                              to_address=address, label=net.label)
                      for subnet in net.subnets if _in_family(subnet, family)]
    late += [replace(r, late=True, label="forwarded") for r in base]
    return early + late


def desired_rules(
    cfg: Config,
    inventory: Inventory = Inventory(),  # noqa: B008  # a frozen value, safe to share
    families: Sequence[Family] | None = None,
) -> tuple[Rule, ...]:
    """The ordered entries of portguard's chains for ``families`` (default: the configured ones).

    Two runtimes may declare the same thing (flannel's subnet.env and the operator's ``[masquerade]``): the
    rules are the same values, kept once.
    """
    rules: list[Rule] = []
    for family in families if families is not None else cfg.families:
        rules += _family_rules(family, cfg, inventory)
    return tuple(dict.fromkeys(rules))
