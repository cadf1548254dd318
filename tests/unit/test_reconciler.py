"""The reconciler's loop: write, verify, and write again at once when another writer undid the write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from portguard.backends import Observation, RuleStatus, State
from portguard.config import Config
from portguard.desired import desired_rules
from portguard.reconciler import Reconciler
from portguard.rules import Rule

RULES = desired_rules(Config())


class _Table:
    """A fake backend that keeps state: ``undo`` later writers erase the next writes."""

    name = "fake"

    def __init__(self, undo: int) -> None:
        self.present = False
        self.undo = undo
        self.writes = 0

    def probe(self) -> None:
        return None

    def render(self, rules: Sequence[Rule]) -> str:
        return ""

    def observe(self, rules: Sequence[Rule]) -> Observation:
        state = State.HEALTHY if self.present else State.ABSENT
        return Observation(self.name, tuple(RuleStatus(r, state) for r in rules))

    def ensure(self, rules: Sequence[Rule], seen: Observation | None = None) -> None:
        self.writes += 1
        self.present = self.undo == 0
        self.undo = max(0, self.undo - 1)

    def remove(self) -> int:
        return 0


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((level, event, kw))


def test_a_write_undone_by_another_writer_is_redone_at_once() -> None:
    """One competing commit after ours: the same sync writes again and ends healthy, logging only the repair."""
    table, log = _Table(undo=1), _Log()
    report = Reconciler(table, RULES, log, sleep=lambda _s: None).sync()
    assert table.writes == 2 and report.after.healthy
    assert [e[1] for e in log.events if e[0] != "debug"] == ["rule.repaired"]


def test_a_writer_that_keeps_going_is_reported_after_three_rounds() -> None:
    """A fight the sync cannot win: three writes, then rule.unrepaired at error level (the runner backs off)."""
    table, log = _Table(undo=10), _Log()
    report = Reconciler(table, RULES, log, sleep=lambda _s: None).sync()
    assert table.writes == 3 and not report.after.healthy
    assert [(e[0], e[1]) for e in log.events if e[0] != "debug"] == [("error", "rule.unrepaired")]


def test_a_healthy_table_is_neither_written_nor_logged() -> None:
    """No-op sync: no write, no log line at all."""
    table, log = _Table(undo=0), _Log()
    table.present = True
    report = Reconciler(table, RULES, log).sync()
    assert table.writes == 0 and not report.changed and log.events == []
