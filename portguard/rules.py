"""The rule model: pure values derived from the configuration and the runtimes' inventory, and their marks.

Every backend installs the same ordered list of entries per address family in two chains portguard owns:

* the *early* chain decides before every other source NAT on the host: exclusions (RETURN), then the
  translations a runtime would make itself (its masquerade or SNAT), with the port moved;
* the *late* chain (``late=True``) runs after every other source NAT, so it only ever sees connections
  nobody translated (the kernel stops at the first NAT binding): exclusions, then a port-only SNAT.

A translation changes the source *port* and, where a runtime or the operator asked for it, nothing else:

* ``SNAT`` without ``to_address`` is port-only (the address stays);
* ``SNAT`` with ``to_address`` is what Docker does for a network with ``host_ipv4``;
* ``MASQUERADE`` takes the egress interface's address, as the runtime's own MASQUERADE would.

Each entry carries a mark ``portguard:<hash>`` (exactly eight lowercase hex digits) taken over
its canonical spec, so a config or inventory change turns the old entries into stale ones that
are found and removed, and nothing of another shape is ever mistaken for portguard's.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field

__all__ = [
    "MARK_PREFIX",
    "Action",
    "Family",
    "PortRange",
    "Protocol",
    "Rule",
    "is_mark",
    "parse_mark",
]

MARK_PREFIX = "portguard:"
_MARK = re.compile(r"portguard:[0-9a-f]{8}")


class Family(enum.StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Action(enum.StrEnum):
    RETURN = "return"
    MASQUERADE = "masquerade"
    SNAT = "snat"


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    low: int
    high: int

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry of portguard's chain: an exclusion (RETURN) or a source-port translation."""

    family: Family
    action: Action
    out_interface: str | None = None
    protocol: Protocol | None = None
    sport: PortRange | None = None
    to_ports: PortRange | None = None
    source: str | None = None  # CIDR in canonical form (a Docker network's subnet)
    destination: str | None = None  # CIDR in canonical form (an excluded destination)
    local_source: bool = False  # only packets whose source address is one of this host's own
    to_address: str | None = None  # SNAT to this address; None with SNAT keeps the address
    fully_random: bool = False
    fwmark: tuple[int, int] | None = None  # (value, mask): only packets whose mark & mask == value
    late: bool = False  # in the late chain, after every other source NAT
    label: str = field(default="", compare=False)  # who wants it: host, forwarded, net:NAME, podman:NAME, exclude

    @property
    def spec(self) -> str:
        """Canonical text of everything that defines the rule; the mark hashes it."""
        parts = [
            self.family.value,
            self.action.value,
            f"oif={self.out_interface or '*'}",
            f"proto={self.protocol.value if self.protocol else '*'}",
            f"sport={self.sport or '*'}",
            f"to={self.to_ports or '*'}",
        ]
        # Fields added later only appear when set, so the marks of the earlier shapes stay stable.
        if self.source:
            parts.append(f"src={self.source}")
        if self.destination:
            parts.append(f"dst={self.destination}")
        if self.local_source:
            parts.append("src-type=local")
        if self.to_address:
            parts.append(f"to-addr={self.to_address}")
        if self.fully_random:
            parts.append("fully-random")
        if self.fwmark:
            parts.append(f"mark={self.fwmark[0]:#x}/{self.fwmark[1]:#x}")
        if self.late:
            parts.append("late")
        return " ".join(parts)

    @property
    def mark(self) -> str:
        digest = hashlib.sha256(self.spec.encode()).hexdigest()[:8]
        return MARK_PREFIX + digest

    @property
    def name(self) -> str:
        """A short human name used in logs, reports and metric labels."""
        late = "/late" if self.late else ""
        if self.action is Action.RETURN:
            what = self.out_interface or self.destination
            if self.source:  # a runtime's own exception: from its network, towards a destination it leaves alone
                what = f"{self.label or self.source}->{self.destination}"
            return f"{self.family.value}/exclude/{what}{late}"
        proto = self.protocol.value if self.protocol else "any"
        via = f"/{self.out_interface}" if self.out_interface else ""
        return f"{self.family.value}/{proto}/{self.label or 'all'}{via}"

    @property
    def port_only(self) -> bool:
        """Does this translation keep the source address?"""
        return self.action is Action.SNAT and self.to_address is None


def parse_mark(text: str) -> tuple[int, int] | None:
    """A firewall mark ``0x4000/0x4000`` (value/mask; a bare value means all 32 bits) as (value, mask); None when
    it is not one (a value with bits outside its mask matches nothing)."""
    value, _, mask = text.strip().partition("/")
    try:
        v, m = int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF
    except ValueError:
        return None
    if not (0 <= v <= 0xFFFFFFFF and 0 < m <= 0xFFFFFFFF) or v & ~m:
        return None
    return v, m


def is_mark(comment: str | None) -> bool:
    """Exactly portguard's mark: the prefix and eight lowercase hex digits, nothing before or after."""
    return comment is not None and _MARK.fullmatch(comment) is not None
