"""Supervision: every worker of ``portguard run`` is restarted when it dies, or the daemon exits.

A guard that stays up and stops guarding is the worst failure.  A worker that raises (or returns
while the daemon is running) is logged once with its traceback (``worker.crashed``), counted, and
started again after a backoff.  One that keeps crashing (``max_crashes`` within ``window`` seconds)
cannot be kept alive: :attr:`Supervisor.failed` is set and the daemon exits 2, so systemd or the
container runtime restarts the whole process.  :class:`RestartPolicy` is the pure decision.
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from portguard.logs import Logger

__all__ = ["Flag", "RestartPolicy", "Stop", "Supervisor", "Worker", "wait_readable"]

Worker = Callable[[threading.Event], None]  # runs until the event is set


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class Flag(threading.Event):
    """An Event that select() can wait on too: set() makes :meth:`fileno` readable until clear().  A socket pair,
    not a pipe: once closed, a late set() cannot write into a reused fd."""

    def __init__(self) -> None:
        super().__init__()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def set(self) -> None:
        super().set()
        with contextlib.suppress(OSError):  # closed, or already signalled and full: readable either way
            self._writer.send(b"\0")

    def clear(self) -> None:
        super().clear()
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while self._reader.recv(4096):
                pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


class Stop(Flag):
    """A worker's stop request: a worker blocked on its own file descriptors waits on it with them
    (:func:`wait_readable`) and needs no timeout slices to notice it; idle, it sleeps until there is something
    to read."""


def wait_readable(stop: threading.Event, *files: _HasFileno, timeout: float | None = None) -> bool:
    """Block until one of ``files`` is readable (True), or ``stop`` is set or ``timeout`` seconds pass (False).

    A :class:`Flag` (a :class:`Stop`) is waited on with the files; a plain Event (a test's) is looked at every
    0.5 s.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    watched: list[_HasFileno] = [*files, stop] if isinstance(stop, Flag) else list(files)
    while not stop.is_set():
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        if not isinstance(stop, Flag):
            remaining = 0.5 if remaining is None else min(remaining, 0.5)
        ready, _, _ = select.select(watched, [], [], remaining)
        if ready and not stop.is_set():
            return True  # a file (the stop fd alone is readable only once stop is set)
    return False


@dataclass
class RestartPolicy:
    max_crashes: int = 5
    window: float = 60.0
    first_delay: float = 0.05
    max_delay: float = 5.0
    crashes: collections.deque[float] = field(default_factory=collections.deque)

    def crashed(self, now: float) -> float | None:
        """Record a crash; the delay before the restart, or None when the worker cannot be kept alive."""
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.window:
            self.crashes.popleft()
        if len(self.crashes) > self.max_crashes:
            return None
        return float(min(self.max_delay, self.first_delay * 2 ** (len(self.crashes) - 1)))


class Supervisor:
    def __init__(
        self,
        log: Logger,
        *,
        on_restart: Callable[[str], None] = lambda _name: None,
        policy: Callable[[], RestartPolicy] = RestartPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._on_restart = on_restart
        self._policy = policy
        self._clock = clock
        self.stopping = threading.Event()
        self.failed = threading.Event()  # a worker could not be kept alive: exit 2
        self.failed_worker = ""
        self._threads: dict[str, threading.Thread] = {}
        self._stops: dict[str, Stop] = {}

    def start(self, name: str, work: Worker) -> None:
        stop = Stop()
        self._stops[name] = stop
        thread = threading.Thread(target=self._keep, args=(name, work, stop), name=name, daemon=True)
        self._threads[name] = thread
        thread.start()

    def restart(self, name: str, work: Worker) -> None:
        """Replace a worker (a reload changed what it does): stop the old one, start the new."""
        self.stop_one(name)
        self.start(name, work)

    def stop_one(self, name: str, timeout: float = 5.0) -> None:
        if name in self._stops:
            self._stops[name].set()
            self._threads[name].join(timeout)

    def _keep(self, name: str, work: Worker, stop: Stop) -> None:
        try:
            self._keep_up(name, work, stop)
        finally:
            stop.close()

    def _keep_up(self, name: str, work: Worker, stop: threading.Event) -> None:
        policy = self._policy()
        while not stop.is_set() and not self.stopping.is_set():
            try:
                work(stop)
                if stop.is_set() or self.stopping.is_set():
                    return
                self._log.error("worker.crashed", worker=name, error="returned while the daemon runs")
            except Exception:  # noqa: BLE001  # the point of a supervisor: any bug costs a restart, not the guard
                self._log.error("worker.crashed", worker=name, exc_info=True)
            self._on_restart(name)
            delay = policy.crashed(self._clock())
            if delay is None:
                self._log.critical("worker.gave_up", worker=name, crashes=policy.max_crashes,
                                   window_s=policy.window, action="exit 2 so the service manager restarts portguard")
                self.failed_worker = name
                self.failed.set()
                return
            stop.wait(delay)

    def alive(self) -> bool:
        """Every worker's thread is running (for /healthz)."""
        return not self.failed.is_set() and all(t.is_alive() for t in self._threads.values())

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        for stop in self._stops.values():
            stop.set()
        deadline = self._clock() + timeout
        for thread in self._threads.values():
            thread.join(max(0.0, deadline - self._clock()))
