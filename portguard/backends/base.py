"""What every backend shares: the Backend protocol and the observation it reports."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from portguard.rules import Rule

__all__ = ["Backend", "Observation", "RuleStatus", "State"]


class State(enum.StrEnum):
    HEALTHY = "healthy"
    ABSENT = "absent"
    SHADOWED = "shadowed"  # something that can decide NAT for the same packets runs first
    DUPLICATED = "duplicated"
    MISORDERED = "misordered"  # present once, but not where the chain's order needs it


@dataclass(frozen=True, slots=True)
class RuleStatus:
    rule: Rule
    state: State
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Observation:
    """What a backend saw: a state per desired rule, and owned objects nobody wants any more."""

    backend: str
    statuses: tuple[RuleStatus, ...]
    stale: tuple[str, ...] = ()
    shadowed_by: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = field(default=(), compare=False)
    # What the backend would write to fix what it saw; handed back to ensure() so a repair
    # need not read the tables twice.  Opaque outside the backend.
    plan: object = field(default=None, compare=False, repr=False)

    @property
    def healthy(self) -> bool:
        return not self.stale and not self.conflicts and all(s.state is State.HEALTHY for s in self.statuses)

    @property
    def needs_write(self) -> bool:
        """Conflicts are about the environment; only rule states and stale objects need a write."""
        return bool(self.stale) or any(s.state is not State.HEALTHY for s in self.statuses)

    def with_conflicts(self, conflicts: Sequence[str]) -> Observation:
        return Observation(self.backend, self.statuses, self.stale, self.shadowed_by, tuple(conflicts), self.plan)


class Backend(Protocol):
    """The only code that touches the kernel's tables."""

    name: str

    def probe(self) -> None:
        """Raise FatalError naming what to install when this backend cannot work here."""

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
