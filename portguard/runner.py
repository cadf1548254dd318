"""One runner for every trigger: coalesce requests, bound the rate, guarantee a periodic sync,
back off after failures (after Kubernetes' BoundedFrequencyRunner).

:class:`Schedule` is the pure decision logic, driven by an injected clock; :class:`SyncRunner`
is the thin thread loop around it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Schedule", "SyncRunner"]


@dataclass
class Schedule:
    min_interval: float
    max_interval: float
    max_backoff: float
    jitter: Callable[[], float] = random.random  # in [0, 1)
    pending: bool = False
    last_run: float = float("-inf")
    next_periodic: float = 0.0
    retry_at: float | None = None
    failures: int = 0
    later: list[float] = field(default_factory=list)  # requested future syncs (re-checks)

    def start(self, now: float) -> None:
        self.pending = True
        self.next_periodic = now + self._jittered(self.max_interval)

    def _jittered(self, interval: float) -> float:
        return interval * (0.9 + 0.2 * self.jitter())

    def request(self) -> None:
        self.pending = True

    def request_at(self, when: float) -> None:
        self.later.append(when)

    def due(self, now: float) -> bool:
        """Is a sync wanted now (ignoring the rate limit)?  A new request cuts a backoff short, as in
        Kubernetes' BoundedFrequencyRunner: the change it reports may be exactly what the retry waits for."""
        if self.pending:
            return True
        if self.retry_at is not None:
            return now >= self.retry_at
        return now >= self.next_periodic or any(t <= now for t in self.later)

    def next_wakeup(self, now: float) -> float:
        """When to look again: the earliest of every deadline, respecting the minimum interval."""
        if self.due(now):
            return max(now, self.last_run + self.min_interval)
        deadline = self.retry_at if self.retry_at is not None else min([self.next_periodic, *self.later])
        return max(deadline, self.last_run + self.min_interval)

    def begin(self, now: float) -> None:
        """A sync starts now: it covers every request made so far."""
        self.pending = False
        self.later = [t for t in self.later if t > now]
        self.last_run = now

    def finish(self, now: float, ok: bool) -> float | None:
        """Record the result; returns the backoff delay after a failure, else None."""
        if ok:
            self.failures = 0
            self.retry_at = None
            self.next_periodic = now + self._jittered(self.max_interval)
            return None
        self.failures += 1
        delay = min(self.max_backoff, 0.1 * float(2 ** min(self.failures - 1, 20))) * (0.5 + 0.5 * self.jitter())
        self.retry_at = now + delay
        return delay


class SyncRunner:
    """Runs ``sync`` on a thread whenever the schedule says so; ``sync`` returns success."""

    def __init__(
        self,
        sync: Callable[[], bool],
        schedule: Schedule,
        *,
        heartbeat: Callable[[], None] = lambda: None,
        heartbeat_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sync = sync
        self.schedule = schedule
        self._heartbeat = heartbeat
        self._heartbeat_interval = heartbeat_interval
        self._clock = clock
        self._cond = threading.Condition()
        self._stop = False

    def request(self) -> None:
        with self._cond:
            self.schedule.request()
            self._cond.notify()

    def request_in(self, *delays: float) -> None:
        with self._cond:
            now = self._clock()
            for d in delays:
                self.schedule.request_at(now + d)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def set_min_interval(self, seconds: float) -> None:
        with self._cond:
            self.schedule.min_interval = seconds

    def configure(self, min_interval: float, max_interval: float, max_backoff: float) -> None:
        """New intervals (a reloaded config); they apply from the next wait on."""
        with self._cond:
            self.schedule.min_interval = min_interval
            self.schedule.max_interval = max_interval
            self.schedule.max_backoff = max_backoff
            self._cond.notify()

    def loop(self, _stop: threading.Event | None = None) -> None:
        """Run until stop(); the event argument lets a supervisor run it (stop() is what ends it)."""
        with self._cond:
            self.schedule.start(self._clock())
        while True:
            with self._cond:
                while not self._stop:
                    now = self._clock()
                    wake = self.schedule.next_wakeup(now)
                    if self.schedule.due(now) and wake <= now:
                        break
                    self._cond.wait(min(wake - now, self._heartbeat_interval))
                    self._heartbeat()
                if self._stop:
                    return
                self.schedule.begin(self._clock())
            ok = self._sync()
            with self._cond:
                self.schedule.finish(self._clock(), ok)
            self._heartbeat()
