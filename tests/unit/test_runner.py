"""The runner's schedule with an injected clock: coalescing, rate limit, backstop, backoff."""

from __future__ import annotations

import threading
import time

from portguard.runner import Schedule, SyncRunner


def _schedule(**kw: float) -> Schedule:
    s = Schedule(min_interval=kw.get("min_interval", 1.0), max_interval=kw.get("max_interval", 30.0),
                 max_backoff=kw.get("max_backoff", 8.0), jitter=lambda: 0.5)
    s.start(0.0)
    return s


def test_first_sync_is_due_at_start() -> None:
    """The runner syncs immediately at start: enforcement from the first second."""
    s = _schedule()
    assert s.due(0.0) and s.next_wakeup(0.0) == 0.0


def test_requests_during_a_sync_coalesce_into_one_follow_up() -> None:
    """Many requests after a sync began lead to exactly one more sync, no earlier than min_interval."""
    s = _schedule()
    s.begin(0.0)
    for _ in range(50_000):
        s.request()
    s.finish(0.01, ok=True)
    assert s.due(0.02) and s.next_wakeup(0.02) == 1.0
    s.begin(1.0)
    s.finish(1.01, ok=True)
    assert not s.due(1.02)


def test_periodic_backstop_without_requests() -> None:
    """With no triggers at all, a sync is still due after max_interval (jittered +-10%)."""
    s = _schedule()
    s.begin(0.0)
    s.finish(0.0, ok=True)
    assert not s.due(29.0) and s.due(30.0) and s.next_wakeup(1.0) == 30.0


def test_scheduled_rechecks_fire_in_order() -> None:
    """Re-checks requested for later (after a Docker reconnect) become due at their time."""
    s = _schedule()
    s.begin(0.0)
    s.finish(0.0, ok=True)
    for t in (1.0, 2.0, 4.0):
        s.request_at(t)
    assert s.next_wakeup(0.5) == 1.0 and s.due(1.0)
    s.begin(1.0)
    s.finish(1.0, ok=True)
    assert s.next_wakeup(1.5) == 2.0


def test_failures_back_off_exponentially_up_to_the_cap_and_a_request_cuts_the_backoff_short() -> None:
    """After failures, the next attempt waits longer each time (capped); a new request makes a sync due at once
    (still no faster than the minimum interval), as in Kubernetes' BoundedFrequencyRunner."""
    s = _schedule(max_backoff=1.0)
    delays = []
    now = 0.0
    for _ in range(6):
        s.begin(now)
        delay = s.finish(now, ok=False)
        assert delay is not None
        delays.append(delay)
        assert not s.due(now + delay / 2)
        s.request()
        assert s.due(now + delay / 2) and s.next_wakeup(now) == max(now, s.last_run + s.min_interval)
        s.pending = False
        now += delay
    assert delays == sorted(delays) and delays[-1] == 0.75  # 1.0 cap * (0.5 + 0.5 * jitter)
    s.begin(now)
    assert s.finish(now, ok=True) is None and s.retry_at is None


def test_thread_loop_runs_on_request_and_stops() -> None:
    """The real thread loop runs the first sync, runs again on request, and stops when told."""
    calls: list[float] = []
    done = threading.Event()

    def sync() -> bool:
        calls.append(time.monotonic())
        if len(calls) == 2:
            done.set()
        return True

    runner = SyncRunner(sync, Schedule(min_interval=0.01, max_interval=3600, max_backoff=1))
    thread = threading.Thread(target=runner.loop)
    thread.start()
    time.sleep(0.05)
    runner.request()
    assert done.wait(2)
    runner.stop()
    thread.join(2)
    assert not thread.is_alive() and len(calls) == 2
