"""The daemon's runtime directory: the single-instance lock, the runtimes' last inventory and the last reload's
outcome.

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
from pathlib import Path
from typing import Any

from portguard.errors import FatalError
from portguard.inventory import Inventory

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

    def daemon_pid(self) -> int | None:
        """The PID of the `portguard run` guarding this namespace, or None when none holds the lock."""
        path = self.path / "run.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else None
            return None  # the lock was free: no daemon
        finally:
            os.close(fd)

    def _write(self, name: str, doc: object) -> None:
        """Best effort and atomic: a reader sees the old document or the new one."""
        try:
            self._ensure()
            tmp = self.path / f"{name}.tmp"
            tmp.write_text(json.dumps(doc))
            tmp.replace(self.path / name)
        except (OSError, FatalError):
            return

    def _read(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def record_reload(self, generation: int, ok: bool, detail: str) -> None:
        """The outcome of the daemon's config reload number ``generation``, for `portguard reload`."""
        self._write("reload.json", {"generation": generation, "ok": ok, "detail": detail})

    def reload_outcome(self) -> tuple[int, bool, str]:
        """(generation, ok, detail) of the last reload; generation 0 before the first."""
        doc = self._read("reload.json")
        if not isinstance(doc, dict) or not isinstance(doc.get("generation"), int):
            return 0, False, ""
        return doc["generation"], bool(doc.get("ok")), str(doc.get("detail", ""))

    def save_inventory(self, inventory: Inventory) -> None:
        """Record the runtimes' inventory for commands that cannot ask a runtime themselves (best effort)."""
        self._write("inventory.json", inventory.to_doc())

    def load_inventory(self) -> Inventory | None:
        """The inventory the daemon here last saw (validated again on the way in; it may have stopped since: its
        last view is still the best one of a runtime that does not answer), or None."""
        doc = self._read("inventory.json")
        return Inventory.from_doc(doc) if doc is not None else None
