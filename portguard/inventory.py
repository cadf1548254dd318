"""The runtimes' inventory: pure values saying which networks this host has and how their runtime translates them.

Every runtime portguard knows arrives the same way: a source under ``watch/`` notices a change, its reader in
``runtimes/`` turns what it found into a :class:`Part`, and ``desired.py`` turns the merged :class:`Inventory`
into rules.  The parts:

* ``docker``: the Engine API's networks (runtimes/docker.py);
* ``podman``: netavark's network files and Podman's default network (runtimes/podman.py);
* ``cni``: CNI configuration lists and flannel's ``subnet.env`` (runtimes/cni.py);
* ``kube-proxy``: the firewall mark kube-proxy masquerades by (runtimes/kubeproxy.py);
* ``config``: what the operator declares in ``[masquerade]`` (ip-masq-agent style), for what cannot be found.

Nothing here reads anything: every value was validated by the reader that made it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from portguard.config import interface_ok
from portguard.rules import parse_mark

__all__ = ["MULTICAST", "Inventory", "Network", "Part", "address", "canonical_cidrs"]

# Where a runtime's masquerade stops: multicast is never translated (netavark, CNI's ipMasq, flannel).
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}


def canonical_cidrs(values: Iterable[object]) -> tuple[str, ...]:
    """The values that parse as networks, canonical and in order, without duplicates; anything else is dropped."""
    out: list[str] = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(str(value), strict=False)))
        except ValueError:
            continue
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True, slots=True)
class Network:
    """A network of a runtime, as far as source NAT on this host goes."""

    runtime: str  # docker, podman, cni, flannel, config
    name: str
    bridge: str  # the interface its members sit on ("" when none of ours): traffic staying on it is never translated
    subnets: tuple[str, ...]  # canonical CIDRs, IPv4 and IPv6
    masquerade: bool  # its runtime masquerades what leaves it (else it leaves with its own address)
    host_ipv4: str | None = None  # when it translates, to this address (Docker's host_ipv4, netavark's outbound_addr4)
    host_ipv6: str | None = None
    routed_ipv4: bool = False  # no NAT at all for this family (Docker's gateway mode "routed")
    routed_ipv6: bool = False
    keep_destinations: tuple[str, ...] = ()  # where its runtime does not translate (its own subnets, multicast, ...)
    id: str = ""

    def nat_address(self, version: int) -> str | None:
        return self.host_ipv4 if version == 4 else self.host_ipv6

    def routed(self, version: int) -> bool:
        return self.routed_ipv4 if version == 4 else self.routed_ipv6

    def translates(self, version: int) -> bool:
        """Does its runtime translate the source of this family's traffic leaving the host?"""
        return self.masquerade and not self.routed(version)

    @property
    def label(self) -> str:
        # Docker's networks were the first: their rules keep the names they always had.
        return f"net:{self.name}" if self.runtime == "docker" else f"{self.runtime}:{self.name}"

    def how(self, version: int) -> str:
        """What its runtime does to the source address, in words (doctor)."""
        if not self.translates(version):
            return "address unchanged (its runtime does not NAT it)"
        to = self.nat_address(version)
        if to:
            return f"SNAT to {to}, as {self.runtime} would"
        return f"masqueraded to the egress address, as {self.runtime} would"


@dataclass(frozen=True, slots=True)
class Part:
    """What one runtime contributes: its networks, and the firewall marks it masquerades by."""

    networks: tuple[Network, ...] = ()
    marks: tuple[tuple[int, int], ...] = ()  # (value, mask): packets with mark & mask == value are masqueraded


@dataclass(frozen=True, slots=True)
class Inventory:
    """Every runtime's part, by runtime name."""

    parts: tuple[tuple[str, Part], ...] = field(default=())

    @staticmethod
    def of(parts: Mapping[str, Part]) -> Inventory:
        return Inventory(tuple(sorted(parts.items())))

    def part(self, runtime: str) -> Part | None:
        return dict(self.parts).get(runtime)

    def with_part(self, runtime: str, part: Part | None) -> Inventory:
        """This inventory with ``runtime``'s part replaced (None: that runtime is gone)."""
        parts = {**dict(self.parts), runtime: part}
        return Inventory.of({name: p for name, p in parts.items() if p is not None})

    @property
    def networks(self) -> tuple[Network, ...]:
        return tuple(n for _, p in self.parts for n in p.networks)

    @property
    def marks(self) -> tuple[tuple[str, tuple[int, int]], ...]:
        """(runtime, mark) for every mark some runtime masquerades by; a mark two runtimes declare, once."""
        found: dict[tuple[int, int], str] = {}
        for name, p in self.parts:
            for mark in p.marks:
                found.setdefault(mark, name)
        return tuple((name, mark) for mark, name in found.items())

    @property
    def runtimes(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    # ---- recorded in the runtime directory for check/apply, read back through the same checks ----

    def to_doc(self) -> dict[str, Any]:
        return {name: {"networks": [asdict(n) for n in p.networks], "marks": [list(m) for m in p.marks]}
                for name, p in self.parts}

    @staticmethod
    def from_doc(doc: object) -> Inventory:
        """Anything malformed is dropped, never guessed at (a recorded file is input like any other)."""
        parts: dict[str, Part] = {}
        for name, raw in (doc.items() if isinstance(doc, dict) else ()):
            if not isinstance(raw, dict):
                continue
            networks = tuple(n for n in map(_network, raw.get("networks") or ()) if n is not None)
            marks = tuple(m for m in (_mark(x) for x in raw.get("marks") or ()) if m is not None)
            parts[str(name)] = Part(networks, marks)
        return Inventory.of(parts)


def _mark(raw: object) -> tuple[int, int] | None:
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) for x in raw):
        return parse_mark(f"{raw[0]}/{raw[1]}")
    return None


def address(raw: object, version: int) -> str | None:
    """``raw`` as a canonical address of that IP version (not the unspecified one), else None."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        addr = ipaddress.ip_address(raw)
    except ValueError:
        return None
    return str(addr) if addr.version == version and not addr.is_unspecified else None


def _network(raw: object) -> Network | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("runtime"), str):
        return None
    bridge = str(raw.get("bridge") or "")
    if bridge and not interface_ok(bridge):
        return None
    net = Network(runtime=raw["runtime"], name=raw["name"], bridge=bridge,
                  subnets=canonical_cidrs(raw.get("subnets") or ()), masquerade=bool(raw.get("masquerade")),
                  routed_ipv4=bool(raw.get("routed_ipv4")), routed_ipv6=bool(raw.get("routed_ipv6")),
                  keep_destinations=canonical_cidrs(raw.get("keep_destinations") or ()), id=str(raw.get("id") or ""))
    return replace(net, host_ipv4=address(raw.get("host_ipv4"), 4), host_ipv6=address(raw.get("host_ipv6"), 6))
