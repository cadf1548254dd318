"""The source of the runtimes read from files and from netfilter: Podman, CNI/flannel, kube-proxy's mark.

One worker for all of them.  It sleeps on inotify (the directories of the files the readers read: Podman's
network directory and containers.conf, the CNI configuration directories, flannel's subnet.env) and wakes the
moment one changes, or after ``interval`` at the latest; then each source compares a cheap fingerprint of what
its reader reads (names, sizes and modification times of the files; for kube-proxy the mark itself, from chain
headers and one chain) and hands the reader's new part to the daemon when it changed.  Idle, it costs one
wake-up per interval.  Where inotify is missing, the interval is the polling period.  Docker has a source of
its own (watch/docker.py): its API has events.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from portguard.config import Config
from portguard.inventory import Part
from portguard.runtimes import READERS
from portguard.supervisor import wait_readable

__all__ = ["DirectoryWatch", "PollingSource", "RuntimeSources", "file_fingerprint", "runtime_sources"]

Worker = Callable[[threading.Event], None]
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
# IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
IN_CHANGES = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400


def file_fingerprint(paths: Iterable[Path]) -> tuple[object, ...]:
    """What changes when a file is added, removed or rewritten in these files or directories (one level)."""
    out: list[object] = []
    for path in paths:
        try:
            entries = sorted(path.iterdir()) if path.is_dir() else [path]
        except OSError:
            entries = []
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue
            out.append((str(entry), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class PollingSource:
    """Hands ``read()`` to ``on_part`` at the first look and whenever ``fingerprint()`` changes (no fingerprint:
    whenever what ``read()`` gives changes)."""

    def __init__(self, name: str, read: Callable[[], Part | None], on_part: Callable[[str, Part | None], None], *,
                 fingerprint: Callable[[], object] | None = None, paths: Callable[[], Sequence[Path]] | None = None,
                 ) -> None:
        self.name = name
        self._read = read
        self._fingerprint = fingerprint
        self._on_part = on_part
        self.paths = paths  # what inotify watches for it (None: nothing to watch, looked at every interval only)
        self._last: object = object()

    def poll(self) -> None:
        """Look once; report the part if what it is read from changed (the first look always reports)."""
        if self._fingerprint is None:
            part = self._read()
            if part != self._last:
                self._last = part
                self._on_part(self.name, part)
            return
        now = self._fingerprint()
        if now != self._last:
            self._last = now
            self._on_part(self.name, self._read())


class DirectoryWatch:
    """inotify on a set of directories."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd: int = fd

    def watch(self, paths: Iterable[Path]) -> None:
        """Directories that exist, and the directory of a file; nothing further up (a parent like /run changes all
        the time): what appears later is found by the periodic look."""
        for path in paths:
            directory = path if path.is_dir() else path.parent
            if directory.is_dir():
                self._add(self.fd, os.fsencode(directory), IN_CHANGES)  # an existing watch is simply kept

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """True when something changed (the events are drained), False on timeout or stop."""
        if not wait_readable(stop, self, timeout=timeout):
            return False
        while True:
            try:
                if not os.read(self.fd, 65536):
                    break
            except BlockingIOError:
                break
        return True

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


class RuntimeSources:
    """The sources, looked at together by one worker: at once on a change inotify reports, else every
    ``interval``."""

    def __init__(self, sources: Sequence[PollingSource], *, interval: float) -> None:
        self.sources = sources
        self._interval = interval

    def poll(self) -> None:
        for source in self.sources:
            source.poll()

    def run(self, stop: threading.Event) -> None:
        try:
            watch: DirectoryWatch | None = DirectoryWatch()
        except OSError:
            watch = None  # no inotify (a seccomp profile, an old kernel): poll every interval
        everything = True
        try:
            while not stop.is_set():
                if watch is not None:
                    # Watches first, then the look: a file written into a directory that just appeared is seen now.
                    watch.watch(p for s in self.sources if s.paths is not None for p in s.paths())
                for source in self.sources:
                    if everything or source.paths is not None:
                        source.poll()
                # Woken by inotify: the watched sources only; after the interval, everything.
                everything = not (stop.wait(self._interval) if watch is None else watch.wait(self._interval, stop))
        finally:
            if watch is not None:
                watch.close()


def runtime_sources(config: Callable[[], Config], on_part: Callable[[str, Part | None], None], *,
                    interval: float = 10.0) -> RuntimeSources:
    """Podman, CNI and kube-proxy, each reading through runtimes.READERS.  Local reads, all of them: the daemon
    polls them once before its first sync, so that the rules it reports READY with already cover what the host's
    files and rules say."""
    from portguard.runtimes import cni, podman

    def reader(name: str) -> Callable[[], Part | None]:
        return lambda: READERS[name].read(config())

    return RuntimeSources([
        PollingSource("podman", reader("podman"), on_part, fingerprint=podman.Fingerprint(file_fingerprint),
                      paths=podman.watched_paths),
        PollingSource("cni", reader("cni"), on_part, fingerprint=lambda: file_fingerprint(cni.watched_paths()),
                      paths=cni.watched_paths),
        # kube-proxy's mark is read from two small listings (chain headers, one chain): the part is its own
        # fingerprint, looked at every interval (its mark changes with its deployment, not with traffic).
        PollingSource("kube-proxy", reader("kube-proxy"), on_part),
    ], interval=interval)
