"""The rule model: pure values derived from the configuration, and their ownership marks.

Every backend installs the same ordered list of entries per address family, inside a chain
portguard owns: first the egress exclusions (RETURN), then the MASQUERADE rules.  Each entry
carries a mark ``portguard:<hash>`` whose hash is taken over the entry's canonical spec, so a
config change turns the old entries into stale ones that are found and removed.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

__all__ = [
    "MARK_PREFIX",
    "Action",
    "Family",
    "PortRange",
    "Protocol",
    "Rule",
    "is_mark",
]

MARK_PREFIX = "portguard:"


class Family(enum.StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Action(enum.StrEnum):
    RETURN = "return"
    MASQUERADE = "masquerade"


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
    """One entry of portguard's chain: an exclusion (RETURN) or a source-port MASQUERADE."""

    family: Family
    action: Action
    out_interface: str | None = None
    protocol: Protocol | None = None
    sport: PortRange | None = None
    to_ports: PortRange | None = None

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
        return " ".join(parts)

    @property
    def mark(self) -> str:
        digest = hashlib.sha256(self.spec.encode()).hexdigest()[:8]
        return MARK_PREFIX + digest

    @property
    def name(self) -> str:
        """A short human name used in logs, reports and metric labels."""
        if self.action is Action.RETURN:
            return f"{self.family.value}/exclude/{self.out_interface}"
        proto = self.protocol.value if self.protocol else "any"
        via = f"/{self.out_interface}" if self.out_interface else ""
        return f"{self.family.value}/{proto}/{self.sport}->{self.to_ports}{via}"


def is_mark(comment: str | None) -> bool:
    return comment is not None and comment.startswith(MARK_PREFIX)
