"""Kernel change notifications: nf_tables multicast on netlink, or a cheap fingerprint for legacy.

Every nf_tables change (iptables-nft included: flushes, deletes, restores, ``nft flush ruleset``)
is multicast to NFNLGRP_NFTABLES 1.4-3 ms after it happens.  We never parse the messages: any
message means "something changed, sync".  A flush of 50,000 rules sends 50,000 messages; they
are read in large chunks and each chunk makes one request, which the runner coalesces anyway.

Legacy xtables sends nothing, so there we poll ``IPT_SO_GET_INFO``: the nat table's entry count,
size and hook offsets, a few dozen bytes from one getsockopt, which change whenever a rule is
added, deleted or moved.  A change requests a full sync.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from portguard.logs import Logger

__all__ = ["LegacyFingerprint", "NftablesNotifications"]

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
_CHUNK = 1 << 20


class NftablesNotifications:
    """Requests a sync on every burst of nf_tables change notifications."""

    def __init__(self, request: Callable[[str], None], log: Logger) -> None:
        self._request = request
        self._log = log
        self._stop = threading.Event()
        self._sock = self._open()

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.settimeout(0.5)  # lets stop() be seen without closing under a blocked recv
        except OSError:
            sock.close()
            raise
        return sock

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(_CHUNK)
                except TimeoutError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    # The burst overran our buffer: changes were certainly made; sync.
                    self._request("kernel.overrun")
                    continue
                if data:
                    self._request("kernel.nftables")
        except OSError as exc:
            self._log.error("kernel.notifications_failed", error=str(exc))
        finally:
            self._sock.close()


class _GetInfo(ctypes.Structure):
    # struct ipt_getinfo / ip6t_getinfo (linux/netfilter_ipv4/ip_tables.h), NF_INET_NUMHOOKS = 5
    _fields_ = [  # ctypes wants a plain list
        ("name", ctypes.c_char * 32),
        ("valid_hooks", ctypes.c_uint),
        ("hook_entry", ctypes.c_uint * 5),
        ("underflow", ctypes.c_uint * 5),
        ("num_entries", ctypes.c_uint),
        ("size", ctypes.c_uint),
    ]


IPT_SO_GET_INFO = 64
_libc = ctypes.CDLL(None, use_errno=True)


class LegacyFingerprint:
    """A cheap fingerprint of a legacy nat table: changes whenever a rule is added, moved or removed."""

    def __init__(self, ipv6: bool = False) -> None:
        self._family = socket.AF_INET6 if ipv6 else socket.AF_INET
        self._level = socket.IPPROTO_IPV6 if ipv6 else socket.IPPROTO_IP
        self._names = Path("/proc/net/ip6_tables_names" if ipv6 else "/proc/net/ip_tables_names")

    def read(self) -> tuple[int, ...] | None:
        """The fingerprint, or None when there is no legacy nat table."""
        # Asking the kernel about a table it has not registered in this namespace registers it
        # (and so reorders NAT hooks): look at the names first.
        try:
            if "nat" not in self._names.read_text().split():
                return None
        except OSError:
            return None
        with socket.socket(self._family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            info = _GetInfo(name=b"nat")
            size = ctypes.c_uint(ctypes.sizeof(info))
            rc = _libc.getsockopt(sock.fileno(), self._level, IPT_SO_GET_INFO, ctypes.byref(info), ctypes.byref(size))
            if rc != 0:
                return None
            return (info.valid_hooks, *info.hook_entry, *info.underflow, info.num_entries, info.size)
