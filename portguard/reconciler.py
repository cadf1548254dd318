"""One level-triggered sync: observe, repair with one atomic write, observe again, report.

Every trigger (CLI ``apply``, a Docker event, a kernel notification, the timer) runs this same
full sync; it is idempotent and logs only real changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from portguard.backends import Backend, Observation, State
from portguard.errors import RetryableError
from portguard.logs import Logger
from portguard.rules import Rule

__all__ = ["Reconciler", "SyncReport"]

_WRITE_ATTEMPTS = 3
_VERIFY_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class SyncReport:
    before: Observation
    after: Observation
    changed: bool
    took_ms: float

    @property
    def repaired(self) -> tuple[tuple[str, State], ...]:
        """(rule name, state it was in) for every rule this sync brought back to healthy."""
        now = {s.rule: s.state for s in self.after.statuses}
        rules = tuple(
            (s.rule.name, s.state)
            for s in self.before.statuses
            if s.state is not State.HEALTHY and now.get(s.rule) is State.HEALTHY
        )
        standby = (("standby", State.ABSENT),) if self.before.standby and not self.after.standby else ()
        return rules + standby


class Reconciler:
    def __init__(
        self,
        backend: Backend,
        rules: Sequence[Rule],
        log: Logger,
        *,
        conflicts: Sequence[str] = (),
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.backend = backend
        self.rules = tuple(rules)
        self.conflicts = tuple(conflicts)
        self._log = log
        self._clock = clock
        self._sleep = sleep

    def observe(self) -> Observation:
        return self.backend.observe(self.rules).with_environment(self.conflicts)

    def set_rules(self, rules: Sequence[Rule]) -> bool:
        """New desired rules (Docker's networks changed); True when they differ."""
        rules = tuple(rules)
        changed = rules != self.rules
        self.rules = rules
        return changed

    def sync(self, *, installing: bool = False) -> SyncReport:
        """Observe, write what a write can fix, verify.  Raises RetryableError, FatalError, or
        UnfixableError (the kernel refuses portguard's write: report, never retry in a loop).

        ``installing``: this is the first write of a daemon or an operator's ``apply``; what it writes is an
        install (``rule.installed``, info), not a repair of something another program broke (``rule.repaired``,
        warning), so that ``journalctl -p warning`` shows only what went wrong."""
        start = self._clock()
        before = self.observe()
        if not before.needs_write:
            return SyncReport(before, before, False, (self._clock() - start) * 1000)
        seen: Observation | None = before
        for _ in range(_VERIFY_ROUNDS):
            self._write(seen)
            after = self.observe()
            if not after.needs_write:
                break
            # Another writer changed the table again right after ours (an iptables-restore of several
            # tables commits one table at a time): write again at once, with what we see now.  A
            # writer that keeps going wins these rounds; the next request starts a new sync.
            self._log.debug("sync.overwritten", states={s.rule.name: s.state.value for s in after.statuses})
            seen = after
        report = SyncReport(before, after, True, (self._clock() - start) * 1000)
        self._report(report, installing=installing)
        return report

    def _write(self, seen: Observation | None) -> None:
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                self.backend.ensure(self.rules, seen if attempt == 0 else None)
                return
            except RetryableError as exc:
                if attempt + 1 == _WRITE_ATTEMPTS:
                    raise
                self._log.debug("sync.retry", error=str(exc), attempt=attempt + 1)
                self._sleep(0.05 * 2**attempt)

    def _report(self, report: SyncReport, *, installing: bool) -> None:
        took = round(report.took_ms, 1)
        backend = self.backend.name
        by_reason: dict[State, list[str]] = {}
        for name, reason in report.repaired:
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            if installing:
                self._log.info("rule.installed", was=reason.value, backend=backend, took_ms=took, rules=names)
            else:
                self._log.warning("rule.repaired", reason=reason.value, backend=backend, took_ms=took, rules=names)
        for obj in report.before.stale:
            if obj not in report.after.stale:
                self._log.info("rule.stale_removed", object=obj, backend=backend, took_ms=took)
        broken = [s for s in report.after.statuses if s.state is not State.HEALTHY and s.fixable]
        if broken or report.after.stale or report.after.standby:
            self._log.error(
                "rule.unrepaired",
                backend=backend,
                rules={s.rule.name: s.state.value for s in broken},
                detail=next((s.detail for s in broken), ""),
                stale=list(report.after.stale),
                standby=list(report.after.standby),
            )

    def remove(self) -> int:
        removed = self.backend.remove()
        if removed:
            self._log.info("rule.removed", objects=removed, backend=self.backend.name)
        return removed
