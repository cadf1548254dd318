"""What the suite must leave as it found it: this machine's own network namespace (links, nft ruleset, iptables
rules), its mounts and named network namespaces, and no process of ours in a network namespace made since.

conftest.py takes a view when the session starts and compares when it ends; a difference fails the run.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HostView", "leftovers"]


def _out(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    return proc.stdout if proc.returncode == 0 else f"<{' '.join(cmd)} exited {proc.returncode}>"


def _net_namespaces() -> dict[int, str]:
    """The network namespace of every process that has one, as its inode text by PID (zombies have none)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = os.readlink(f"/proc/{entry}/ns/net")
            except OSError:
                continue
    return found


def _mounts() -> frozenset[str]:
    # /run/netns itself is bind-mounted onto itself by the first `ip netns add` on a machine (iproute2) and stays:
    # not a leftover of the suite's.  What is mounted below it is.
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return frozenset(line.split()[4] for line in f) - {"/run/netns", "/var/run/netns"}


@dataclass(frozen=True)
class HostView:
    links: str
    ruleset: str
    iptables: str
    ip6tables: str
    named: frozenset[str]
    mounts: frozenset[str]
    namespaces: frozenset[str]  # network namespaces processes were in

    @classmethod
    def take(cls) -> HostView:
        # iptables-save prints a timestamp comment per table: dropped, as are packet counters (-c is not given).
        def save(tool: str) -> str:
            return "\n".join(ln for ln in _out([tool]).splitlines() if not ln.startswith("#"))

        return cls(
            links=_out(["ip", "-br", "link"]),
            ruleset=_out(["nft", "list", "ruleset"]),
            iptables=save("iptables-save"),
            ip6tables=save("ip6tables-save"),
            named=frozenset(line.split()[0] for line in _out(["ip", "netns", "list"]).splitlines() if line.strip()),
            mounts=_mounts(),
            namespaces=frozenset(_net_namespaces().values()),
        )


def leftovers(before: HostView, grace: float = 15.0) -> list[str]:
    """What differs from ``before`` (retried for ``grace`` seconds: processes killed at the end may still be going)."""
    deadline = time.monotonic() + grace
    while True:
        now = HostView.take()
        problems = [f"{name} changed:\n--- before\n{getattr(before, name)}\n--- after\n{getattr(now, name)}"
                    for name in ("links", "ruleset", "iptables", "ip6tables")
                    if getattr(now, name) != getattr(before, name)]
        if now.named - before.named:
            problems.append(f"network namespaces left: {sorted(now.named - before.named)}")
        if now.mounts - before.mounts:
            problems.append(f"mounts left: {sorted(now.mounts - before.mounts)}")
        strays = {pid: ns for pid, ns in _net_namespaces().items() if ns not in before.namespaces}
        for pid in sorted(strays):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            problems.append(f"process {pid} left in a network namespace made during the run: {cmd[:200]}")
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(1.0)
