"""SIGHUP: read and adopt a new config, or keep the old one; never end the daemon.

systemd is told ``RELOADING=1`` with ``MONOTONIC_USEC`` before and ``READY=1`` after (sd_notify(3)),
so ``systemctl reload`` waits for the outcome.  Any failure while reading or adopting (a file that is
not UTF-8, a 5,000-digit number, a backend that is gone, a bug) is logged as ``config.reload_failed``
and the old config stays in force.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from portguard.config import Config
from portguard.health import Health
from portguard.logs import Logger

__all__ = ["Reloader"]


class Reloader:
    def __init__(self, load: Callable[[], Config], adopt: Callable[[Config], None], health: Health, log: Logger,
                 *, monotonic_usec: Callable[[], int] = lambda: time.monotonic_ns() // 1000) -> None:
        self._load = load
        self._adopt = adopt
        self._health = health
        self._log = log
        self._usec = monotonic_usec

    def reload(self, current: Config) -> Config | None:
        """The adopted config, or None when the old one stays."""
        self._health.reloading(self._usec())
        try:
            cfg = self._load()
            self._adopt(cfg)
        except Exception as exc:  # noqa: BLE001  # whatever goes wrong, the running config stays in force
            self._log.error("config.reload_failed", error=" ".join(str(exc).split())[:300] or type(exc).__name__,
                            kept=current.source)
            return None
        finally:
            self._health.reloaded()
        self._log.info("config.reloaded", source=cfg.source)
        return cfg
