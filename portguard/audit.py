"""Effect audit: look at what actually left the host, not at the rule text.

A flow whose original source port lies in ``source_ports`` but whose reply direction shows
the same port (untranslated) outside ``to_ports`` left unprotected: the remote side (and its
ACL) saw a rejected port.  Only flows that leave through the egress scope count (not through a bridge or to a
destination the rules leave alone); the egress interface is found from the routing table (longest prefix),
since conntrack does not record it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from portguard.config import Config, iface_matches
from portguard.conntrack import Flow, ReadStats, is_untranslated, iter_flows
from portguard.rules import Action, Family, PortRange, Protocol, Rule

__all__ = ["Route", "Scope", "audit", "audit_stream", "read_routes", "unprotected"]


@dataclass(frozen=True, slots=True)
class Route:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    dev: str


@dataclass(frozen=True, slots=True)
class Scope:
    """Where portguard translates: the egress interfaces (none: any), and what its rules leave alone (the excluded
    interfaces, every runtime's bridge among them, and the excluded destinations)."""

    interfaces: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()

    @staticmethod
    def of(cfg: Config, rules: Sequence[Rule]) -> Scope:
        """From the rules in force: what they return unconditionally by interface or by destination."""
        plain = [r for r in rules if r.action is Action.RETURN and not r.source]
        return Scope(cfg.egress_interfaces, tuple(dict.fromkeys(r.out_interface for r in plain if r.out_interface)),
                     tuple(dict.fromkeys(r.destination for r in plain if r.destination)))

    def covers(self, dev: str | None, dst: str) -> bool:
        if dev is None or any(iface_matches(p, dev) for p in self.excluded):
            return False
        if self.destinations:
            addr = ipaddress.ip_address(dst)
            if any(addr in ipaddress.ip_network(d) for d in self.destinations):
                return False
        return not self.interfaces or any(iface_matches(p, dev) for p in self.interfaces)


def egress_dev(routes: Sequence[Route], dst: str) -> str | None:
    addr = ipaddress.ip_address(dst)
    best = [r for r in routes if r.network.version == addr.version and addr in r.network]
    return max(best, key=lambda r: r.network.prefixlen).dev if best else None


def unprotected(flows: Sequence[Flow], routes: Sequence[Route], *, source: PortRange, target: PortRange,
                scope: Scope) -> list[Flow]:
    """Flows in scope that left with a matched source port, untranslated and outside the target range."""
    return [f for f in flows if is_untranslated(f, source, target) and scope.covers(egress_dev(routes, f.dst), f.dst)]


def read_routes() -> list[Route]:
    """Unicast routes of every table (``ip -j route``; iproute2, which install.sh and the image install), local
    ones included: a flow to one of the host's own addresses leaves through lo, never through the egress."""
    routes = []
    for family in ("-4", "-6"):
        try:
            proc = subprocess.run(["ip", family, "-j", "route", "show", "table", "all"], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        try:
            entries = json.loads(proc.stdout or "[]")
        except json.JSONDecodeError:
            continue
        for e in entries:
            if "dev" not in e or e.get("type", "unicast") not in ("unicast", "local"):
                continue
            dst = e.get("dst", "default")
            net = ("0.0.0.0/0" if family == "-4" else "::/0") if dst == "default" else dst
            try:
                routes.append(Route(ipaddress.ip_network(net, strict=False), e["dev"]))
            except ValueError:
                continue
    return routes


def audit_stream(families: Sequence[Family], protocols: Sequence[Protocol], *, source: PortRange,
                 target: PortRange, scope: Scope, sample: int = 3,
                 stats: ReadStats | None = None) -> tuple[int, list[Flow]]:
    """Count the unprotected flows while conntrack is read (memory stays flat); keep the first few as a sample."""
    routes = read_routes()
    count, first = 0, list[Flow]()
    keep = lambda f: is_untranslated(f, source, target) and scope.covers(egress_dev(routes, f.dst), f.dst)  # noqa: E731
    for flow in iter_flows(families, protocols, keep=keep, stats=stats):
        count += 1
        if len(first) < sample:
            first.append(flow)
    return count, first


def audit(flows: Sequence[Flow], *, source: PortRange, target: PortRange, scope: Scope) -> list[Flow]:
    """The unprotected flows among ``flows`` (from conntrack), scoped with this host's routing table."""
    return unprotected(flows, read_routes(), source=source, target=target, scope=scope)
