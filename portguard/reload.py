"""SIGHUP: read and adopt a new config, or keep the old one; never end the daemon.

systemd is told ``RELOADING=1`` with ``MONOTONIC_USEC`` before and ``READY=1`` after (sd_notify(3)),
so ``systemctl reload`` waits for the outcome.  Any failure while reading or adopting (a file that is
not UTF-8, a 5,000-digit number, a backend that is gone, a bug) is logged as ``config.reload_failed``
and the old config stays in force.  Each outcome is handed to ``on_outcome`` (the runtime directory
records it for ``portguard reload``, which the unit's ExecReload runs).
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
                 *, monotonic_usec: Callable[[], int] = lambda: time.monotonic_ns() // 1000,
                 on_outcome: Callable[[bool, str], None] = lambda _ok, _detail: None) -> None:
        self._load = load
        self._on_outcome = on_outcome
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
            error = " ".join(str(exc).split())[:300] or type(exc).__name__
            self._log.error("config.reload_failed", error=error, kept=current.source)
            self._health.reloaded()
            self._on_outcome(False, f"{error}; the running config ({current.source}) stays in force")
            return None
        self._health.reloaded()
        self._log.info("config.reloaded", source=cfg.source)
        self._on_outcome(True, f"config {cfg.source} in force")
        return cfg
