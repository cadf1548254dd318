"""Throwaway network namespaces for tests: everything netfilter happens in one of these."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from portguard.demo import end_processes

__all__ = ["Netns", "hermetic", "require_root"]

_counter = itertools.count()
REPO = Path(__file__).resolve().parent.parent
# This machine's own runtimes (its Podman and CNI configuration, say) must not become a test's inventory:
# portguard runs in a private mount namespace in which their files are empty and no podman is installed.
# Tests that want a runtime give it its files there (extra mount commands).
_HIDE = ("/etc/cni/net.d", "/etc/containers", "/run/flannel", "/var/lib/rancher")
_HERMETIC = (
    f'for d in {" ".join(_HIDE)}; do [ -d "$d" ] && mount -t tmpfs tmpfs "$d"; done\n'
    'p=$(command -v podman) && mount --bind /dev/null "$p"\n'
    'eval "$PG_MOUNTS"\nexec "$@"'
)


def hermetic(argv: Sequence[str]) -> list[str]:
    """``argv`` in a private mount namespace without this machine's runtime files (``PG_MOUNTS``, when set in the
    environment, is run there first: a test's own runtime files)."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", _HERMETIC, "hermetic", *argv]


def require_root() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("integration tests need root (network namespaces); run the README's test command")


class Netns:
    """A named network namespace with loopback up; processes started in it are ended by PID."""

    def __init__(self, prefix: str = "pgt") -> None:
        require_root()
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.path = f"/var/run/netns/{self.name}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.run(["ip", "link", "set", "lo", "up"])

    def argv(self, cmd: Sequence[str], *, nsenter: bool = False) -> list[str]:
        # nsenter keeps the host's /sys (dockerd needs its cgroup mounts); ip netns exec remounts it.
        if nsenter:
            return ["nsenter", f"--net={self.path}", *cmd]
        return ["ip", "netns", "exec", self.name, *cmd]

    def portguard_argv(self, *args: str) -> list[str]:
        """`python -m portguard ARGS` in this namespace, hermetic (see ``hermetic``)."""
        return hermetic(self.argv([sys.executable, "-m", "portguard", *args]))

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(cmd), input=input, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sh(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], check=check)

    def portguard(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PORTGUARD_")}
        full_env["PORTGUARD_CONFIG"] = "/dev/null"  # hermetic: never the host's /etc/portguard/portguard.toml
        full_env.update(env or {})
        proc = subprocess.run(self.portguard_argv(*args), capture_output=True, text=True, env=full_env,
                              timeout=timeout, check=False)
        return proc

    def popen(self, cmd: Sequence[str], *, nsenter: bool = False, **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv(cmd, nsenter=nsenter), **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        end_processes(self.procs, grace=10)
        # What a portguard run recorded for this namespace, removed while the namespace still holds its inode:
        # the next namespace (on any pytest worker) may get the same inode.
        with contextlib.suppress(OSError):
            shutil.rmtree(f"/run/portguard/net-{os.stat(self.path).st_ino}", ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    # ---- views of the tables, for assertions ----

    def save(self, tool: str, table: str = "nat") -> str:
        return self.run([tool, "-t", table]).stdout

    def rules(self, tool: str, table: str = "nat") -> list[str]:
        """``-A`` lines of a save, counters stripped."""
        return [re.sub(r"^\[\d+:\d+\] ", "", ln) for ln in self.save(tool, table).splitlines() if ln.startswith("-A")]

    def nft(self, *args: str, check: bool = True) -> str:
        return self.run(["nft", *args], check=check).stdout


def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
