"""A `portguard run` started in a test namespace, watched through its sd_notify socket and JSON log."""

from __future__ import annotations

import json
import os
import signal as signals
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netns import Netns, wait_for

__all__ = ["SCRAPE", "PortguardDaemon", "metric", "scrape"]

SCRAPE = """
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


def scrape(ns: Netns, path: str, port: int = 9640) -> tuple[int, str]:
    """(HTTP status, body) of the metrics endpoint, asked from inside the namespace."""
    proc = ns.run([sys.executable, "-c", SCRAPE, f"http://127.0.0.1:{port}{path}"], timeout=40)
    code, _, body = proc.stdout.partition("\n")
    return int(code), body


def metric(body: str, name: str) -> float:
    """Sum of every sample of ``name`` (any labels) in a scrape."""
    values = [float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
              if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {"]
    assert values, f"{name} not in the scrape"
    return sum(values)


class PortguardDaemon:
    """``portguard run ARGS`` in ``ns`` (this checkout's, hermetic), or ``launch(env)``'s argv when given (another
    userland's own portguard); its sd_notify socket is made in ``workdir`` (``notify_as``: the socket's path as
    the daemon sees it, when that differs)."""

    def __init__(self, ns: Netns, workdir: Path, *args: str, env: dict[str, str] | None = None,
                 watchdog_usec: int | None = None, launch: Callable[[dict[str, str]], list[str]] | None = None,
                 notify_as: Callable[[str], str] = lambda path: path) -> None:
        self.ns = ns
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"portguard-{time.monotonic_ns()}.log"
        sock_path = str(workdir / f"notify-{time.monotonic_ns()}.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(sock_path)
        self.notify.settimeout(0.2)
        self.notes: list[str] = []
        variables = {"NOTIFY_SOCKET": notify_as(sock_path), "PORTGUARD_LOG_LEVEL": "debug"}
        if launch is None:
            variables["PORTGUARD_CONFIG"] = "/dev/null"  # hermetic: never this machine's /etc/portguard/portguard.toml
        if watchdog_usec:
            variables["WATCHDOG_USEC"] = str(watchdog_usec)
        variables.update(env or {})
        self._log_file = self.log_path.open("w")
        if launch is None:
            full_env = {k: v for k, v in os.environ.items() if not k.startswith("PORTGUARD_")}
            self.proc = subprocess.Popen(ns.portguard_argv("run", *args), stdout=self._log_file,
                                         stderr=subprocess.STDOUT, env={**full_env, **variables})
        else:
            self.proc = subprocess.Popen(launch(variables), stdout=self._log_file, stderr=subprocess.STDOUT)
        ns.procs.append(self.proc)  # ended with the namespace too

    def drain(self) -> list[str]:
        """Collect every notification sent so far."""
        self.notify.setblocking(False)
        try:
            while True:
                self.notes.extend(self.notify.recv(4096).decode().splitlines())
        except BlockingIOError:
            pass
        finally:
            self.notify.settimeout(0.2)
        return self.notes

    def wait_note(self, note: str, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if note in self.notes:
                return True
            try:
                self.notes.extend(self.notify.recv(4096).decode().splitlines())
            except TimeoutError:
                if self.proc.poll() is not None:
                    return False
        return note in self.notes

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": "unparsed", "line": line})
        return out

    def stacks(self) -> str:
        """Every thread's stack, as SIGUSR1 makes the daemon write it (for an assertion's message)."""
        seen = len(self.events())
        self.proc.send_signal(signals.SIGUSR1)

        def dump() -> str:
            return "\n".join(e.get("line", "") for e in self.events()[seen:] if e.get("event") == "unparsed")

        wait_for(lambda: "run_daemon" in dump(), 10)  # the main thread's stack: the dump is written in one go
        return dump()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 10.0, count: int = 1) -> bool:
        return wait_for(lambda: len(self.named(name)) >= count, timeout)

    def send(self, sig: signals.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: signals.Signals = signals.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        """Send ``sig``; returns (exit code, seconds it took to exit)."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()
        self.notify.close()
