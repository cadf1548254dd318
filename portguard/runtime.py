"""The daemon's runtime directory: the single-instance lock and the last Docker inventory.

``/run/portguard`` is root's (systemd's RuntimeDirectory, mode 0700), so no unprivileged process can
take the lock or plant a file; one subdirectory per network namespace (named by the namespace's
inode), because one daemon guards one namespace.  The old abstract unix socket could be bound first
by any user in the namespace, which kept portguard from starting at all.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import asdict
from pathlib import Path

from portguard.errors import FatalError
from portguard.networks import DockerNetwork, parse_networks

__all__ = ["RuntimeDir"]

RUN_DIR = Path("/run/portguard")


class RuntimeDir:
    def __init__(self, base: Path = RUN_DIR) -> None:
        netns = os.stat("/proc/self/ns/net").st_ino
        self.base = base
        self.path = base / f"net-{netns}"
        self._lock_fd: int | None = None

    def _ensure(self) -> None:
        for path in (self.base, self.path):
            try:
                path.mkdir(mode=0o700, exist_ok=True)
                info = path.lstat()
            except OSError as exc:
                raise FatalError(f"runtime directory {path}: {exc.strerror}") from None
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
                raise FatalError(f"runtime directory {path} is not a directory owned by this user and closed to others")

    def lock(self) -> None:
        """One daemon per network namespace: an exclusive lock only a process that can write here can take."""
        self._ensure()
        path = self.path / "run.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise FatalError(f"runtime lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FatalError("another 'portguard run' is already active in this network namespace") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def save_networks(self, networks: tuple[DockerNetwork, ...]) -> None:
        """Record Docker's inventory for commands that cannot reach Docker (best effort, atomic)."""
        try:
            self._ensure()
            tmp = self.path / "networks.json.tmp"
            tmp.write_text(json.dumps([asdict(n) for n in networks]))
            tmp.replace(self.path / "networks.json")
        except (OSError, FatalError):
            return

    def load_networks(self) -> tuple[DockerNetwork, ...] | None:
        """The inventory the running daemon last saw here, or None."""
        try:
            raw = json.loads((self.path / "networks.json").read_text())
            # Back through the same parser as Docker's answer: every value is validated again.
            return parse_networks(_as_api(n) for n in raw)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None


def _as_api(n: dict[str, object]) -> dict[str, object]:
    opt = "com.docker.network."
    options = {opt + "bridge.name": n["bridge"], opt + "bridge.enable_ip_masquerade": str(n["masquerade"]).lower(),
               opt + "host_ipv4": n.get("host_ipv4") or "", opt + "host_ipv6": n.get("host_ipv6") or "",
               opt + "bridge.gateway_mode_ipv4": "routed" if n.get("routed_ipv4") else "",
               opt + "bridge.gateway_mode_ipv6": "routed" if n.get("routed_ipv6") else ""}
    subnets = n["subnets"] if isinstance(n["subnets"], list) else []
    return {"Name": n["name"], "Id": n["id"], "Driver": "bridge", "Options": options,
            "IPAM": {"Config": [{"Subnet": s} for s in subnets]}}
