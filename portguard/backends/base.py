"""What every backend shares: the Backend protocol and the observation it reports."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from portguard.rules import Family, Rule

__all__ = ["Backend", "Observation", "RuleStatus", "State", "Watch"]


class State(enum.StrEnum):
    HEALTHY = "healthy"
    ABSENT = "absent"
    SHADOWED = "shadowed"  # something that can decide NAT for the same packets runs first
    DUPLICATED = "duplicated"
    MISORDERED = "misordered"  # present once, but not where the chain's order needs it
    DORMANT = "dormant"  # present, but its table is switched off (nft 'flags dormant')


@dataclass(frozen=True, slots=True)
class RuleStatus:
    rule: Rule
    state: State
    detail: str = ""
    fixable: bool = True  # can a write of portguard's own objects make it healthy?


@dataclass(frozen=True, slots=True)
class Watch:
    """What the daemon must watch to hear about changes that matter to this backend."""

    nf_tables: frozenset[bytes] | None  # nf_tables tables whose rule changes matter (None: every change)
    poll_legacy: bool  # legacy xtables notify nobody: poll their fingerprint
    # Other tables' base chains, (table, chain), at the backend's last look: their deletion may end a shadow
    # (None: not known, every chain deletion counts).
    base_chains: frozenset[tuple[bytes, bytes]] | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """What a backend saw: a state per desired rule, owned objects nobody wants, and what no write fixes."""

    backend: str
    statuses: tuple[RuleStatus, ...]
    stale: tuple[str, ...] = ()
    shadowed_by: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = field(default=(), compare=False)
    bypasses: tuple[str, ...] = field(default=(), compare=False)  # rules elsewhere that skip NAT for our traffic
    standby: tuple[str, ...] = ()  # what is wrong with the standby copy (nftables), fixable
    owner: str = ""  # who owns the table, when the kernel enforces it ("" when nobody does)
    note: str = field(default="", compare=False)  # something to say once (e.g. why ownership is unavailable)
    # What the backend would write to fix what it saw; handed back to ensure() so a repair
    # need not read the tables twice.  Opaque outside the backend.
    plan: object = field(default=None, compare=False, repr=False)

    @property
    def healthy(self) -> bool:
        return not self.needs_write and not self.unfixable and all(s.state is State.HEALTHY for s in self.statuses)

    @property
    def needs_write(self) -> bool:
        """Only what a write of portguard's own objects can fix; the environment never causes a rewrite."""
        return bool(self.stale or self.standby) or any(
            s.state is not State.HEALTHY and s.fixable for s in self.statuses
        )

    @property
    def unfixable(self) -> tuple[str, ...]:
        """What keeps the rules from working that no write of portguard's can change (reported, never fought)."""
        unfixed = tuple(f"{s.rule.name}: {s.detail}" for s in self.statuses if not s.fixable)
        return (*self.conflicts, *self.bypasses, *unfixed)

    def with_environment(self, conflicts: Sequence[str] = (), bypasses: Sequence[str] = ()) -> Observation:
        return replace(self, conflicts=tuple(conflicts), bypasses=tuple(bypasses))


class Backend(Protocol):
    """The only code that touches the kernel's tables."""

    name: str
    watch: Watch

    def probe(self) -> None:
        """Raise FatalError naming what to install when this backend cannot work here."""

    def families(self) -> tuple[Family, ...]:
        """The address families this host can translate with this backend (IPv6 NAT may be missing)."""

    def render(self, rules: Sequence[Rule]) -> str:
        """Exactly what ensure() would install, in the backend's own syntax."""

    def observe(self, rules: Sequence[Rule]) -> Observation:
        """Read-only: the state of every desired rule, and stale owned objects."""

    def ensure(self, rules: Sequence[Rule], seen: Observation | None = None) -> None:
        """One atomic write that makes the tables match; RetryableError on lock or conflict.

        ``seen`` is the observation just made, whose plan the backend may reuse.
        """

    def remove(self) -> int:
        """Delete everything portguard owns and nothing else; returns how many objects went."""

    def close(self) -> None:
        """Release what the backend holds (an nf_tables socket that owns a table)."""
