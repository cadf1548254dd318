"""Which change sources the daemon runs, as workers for the supervisor: the backend says what matters.

* nf_tables notifications (iptables-nft and nft changes) where the kernel has them, filtered by the
  tables the current backend watches (``Backend.watch.nf_tables``);
* a poll: the legacy nat table's fingerprint when the backend says legacy tables matter
  (``Backend.watch.poll_legacy``; legacy xtables notify nobody), or a plain periodic request when
  notifications are unavailable altogether.

Both look at the backend on every event, so a reload that changes the backend needs no restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from portguard.backends import Watch
from portguard.logs import Logger
from portguard.watch.kernel import LegacyFingerprint, NftablesNotifications

__all__ = ["change_sources"]

Worker = Callable[[threading.Event], None]


def change_sources(
    watch: Callable[[], Watch],
    request: Callable[[str], None],
    log: Logger,
    *,
    poll_interval: Callable[[], float],
    on_malformed: Callable[[], None] = lambda: None,
) -> dict[str, Worker]:
    """Workers by name: ``nft-notify`` (when available) and ``poll``."""
    workers: dict[str, Worker] = {}
    try:
        notifications = NftablesNotifications(request, log, watch, on_malformed=on_malformed)
    except OSError as exc:
        log.warning("kernel.notifications_unavailable", error=str(exc), fallback="poll")
    else:
        workers["nft-notify"] = notifications.run
    notified = "nft-notify" in workers

    def poll(stop: threading.Event) -> None:
        prints = [LegacyFingerprint(False), LegacyFingerprint(True)]
        last: list[tuple[int, ...] | None] = [None, None]
        # A legacy fingerprint is one getsockopt: polled every poll_interval (100 ms by default), since a
        # change waits for the next poll and every connection opened meanwhile goes out untranslated.
        # With notifications and no legacy tables the thread only looks, once a second, for a backend change.
        while not stop.wait(poll_interval() if watch().poll_legacy or not notified else 1.0):
            if watch().poll_legacy:
                now = [p.read() for p in prints]
                if now != last:
                    last = now
                    request("kernel.legacy")
            elif not notified:
                request("poll")

    workers["poll"] = poll
    return workers
