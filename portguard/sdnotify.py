"""The sd_notify protocol in a few lines of stdlib: datagrams to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None

    def send(self, *fields: str) -> None:
        if not self._addr:
            return
        # systemd gone or socket not ours: notifications are best effort
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            # Never block the loop on a receiver that doesn't read (the queue holds 10 datagrams).
            sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._addr)
