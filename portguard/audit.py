"""Effect audit: look at what actually left the host, not at the rule text.

A flow whose original source port lies in ``source_ports`` but whose reply direction shows
the same port (untranslated) outside ``to_ports`` left unprotected: the remote side (and its
ACL) saw a rejected port.  Only flows that leave through the egress scope count; the egress
interface is found from the routing table (longest prefix), since conntrack does not record it.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from portguard.conntrack import Flow, ReadStats, is_untranslated, iter_flows
from portguard.rules import Family, PortRange, Protocol

__all__ = ["Route", "audit", "audit_stream", "in_scope", "read_routes", "unprotected"]


@dataclass(frozen=True, slots=True)
class Route:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    dev: str


def _matches(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def egress_dev(routes: Sequence[Route], dst: str) -> str | None:
    addr = ipaddress.ip_address(dst)
    best = [r for r in routes if r.network.version == addr.version and addr in r.network]
    return max(best, key=lambda r: r.network.prefixlen).dev if best else None


def in_scope(dev: str | None, interfaces: Sequence[str], excluded: Sequence[str]) -> bool:
    if dev is None or any(_matches(p, dev) for p in excluded):
        return False
    return not interfaces or any(_matches(p, dev) for p in interfaces)


def unprotected(flows: Sequence[Flow], routes: Sequence[Route], *, source: PortRange, target: PortRange,
                interfaces: Sequence[str], excluded: Sequence[str]) -> list[Flow]:
    """Flows in scope that left with a matched source port, untranslated and outside the target range."""
    return [
        f for f in flows
        if f.sport in source and f.reply_dport == f.sport and f.sport not in target
        and in_scope(egress_dev(routes, f.dst), interfaces, excluded)
    ]


def read_routes() -> list[Route]:
    """Unicast routes of every table (``ip -j route``), local ones included."""
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
                 target: PortRange, interfaces: Sequence[str], excluded: Sequence[str],
                 sample: int = 3, stats: ReadStats | None = None) -> tuple[int, list[Flow]]:
    """Count the unprotected flows while conntrack is read (memory stays flat); keep the first few as a sample."""
    routes = read_routes()
    count, first = 0, list[Flow]()
    keep = lambda f: is_untranslated(f, source, target) and in_scope(egress_dev(routes, f.dst),  # noqa: E731
                                                                     interfaces, excluded)
    for flow in iter_flows(families, protocols, keep=keep, stats=stats):
        count += 1
        if len(first) < sample:
            first.append(flow)
    return count, first


def audit(flows: Sequence[Flow], *, source: PortRange, target: PortRange, interfaces: Sequence[str],
          excluded: Sequence[str]) -> list[Flow]:
    """The unprotected flows among ``flows`` (from conntrack), scoped with this host's routing table."""
    return unprotected(flows, read_routes(), source=source, target=target, interfaces=interfaces, excluded=excluded)
