"""Sources of the runtimes read from files and from netfilter: Podman, CNI/flannel, kube-proxy's mark.

Each one looks at a cheap fingerprint of what its reader reads (the files' names, sizes and modification times;
for kube-proxy the mark itself, from chain headers and one chain) every ``interval`` and hands the reader's new
part to the daemon when the fingerprint changed, and once at start.  Docker has a source of its own
(watch/docker.py): its API has events.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from portguard.config import Config
from portguard.inventory import Part
from portguard.runtimes import READERS

__all__ = ["PollingSource", "file_fingerprint", "runtime_sources"]

Worker = Callable[[threading.Event], None]


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
    """Hands ``read()`` to ``on_part`` at start and whenever ``fingerprint()`` changes (no fingerprint: whenever
    what ``read()`` gives changes)."""

    def __init__(self, name: str, read: Callable[[], Part | None], on_part: Callable[[str, Part | None], None], *,
                 interval: float, fingerprint: Callable[[], object] | None = None) -> None:
        self.name = name
        self._read = read
        self._fingerprint = fingerprint
        self._on_part = on_part
        self._interval = interval

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

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll()
            stop.wait(self._interval)


def runtime_sources(config: Callable[[], Config], on_part: Callable[[str, Part | None], None], *,
                    interval: float = 1.0) -> dict[str, PollingSource]:
    """The sources by name (``podman``, ``cni``, ``kube-proxy``), each reading through runtimes.READERS.  Local
    reads, all of them: the daemon polls each once before its first sync, so that the rules it reports READY
    with already cover what the host's files and rules say."""
    from portguard.runtimes import cni, podman

    def reader(name: str) -> Callable[[], Part | None]:
        return lambda: READERS[name].read(config())

    sources = [
        PollingSource("podman", reader("podman"), on_part, interval=interval,
                      fingerprint=lambda: (podman.installed(), file_fingerprint(podman.watched_paths()))),
        PollingSource("cni", reader("cni"), on_part, interval=interval,
                      fingerprint=lambda: file_fingerprint(cni.watched_paths())),
        # kube-proxy's mark is read from two small listings (chain headers, one chain): the part is its own
        # fingerprint.
        PollingSource("kube-proxy", reader("kube-proxy"), on_part, interval=2 * interval),
    ]
    return {s.name: s for s in sources}
