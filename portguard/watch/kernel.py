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
import struct
import threading
from collections.abc import Callable

from portguard.backends.base import Watch
from portguard.backends.xtables import legacy_nat_registered
from portguard.logs import Logger
from portguard.rules import Family
from portguard.supervisor import wait_readable

__all__ = ["LegacyFingerprint", "NftablesNotifications", "malformed", "relevant"]

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
_CHUNK = 1 << 20


NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
# Message types whose first attribute (NFTA_*_TABLE = 1, NFTA_TABLE_NAME = 1) names the table they belong to:
# tables, rules, sets, set elements, objects, flowtables (new/del of each).  Another table coming or going cannot
# put anything before portguard's chains by itself; its base chains announce themselves (below).  iptables-nft
# sends NEWTABLE for its table with every change it makes.
_PER_TABLE = frozenset({0, 2, 6, 8, 9, 11, 12, 14, 18, 20, 22, 24})
# Chain messages (NEWCHAIN, DELCHAIN) count for a watched table, or when they carry NFTA_CHAIN_HOOK (4): a base
# chain elsewhere, which can run before portguard's.  A regular chain of another table cannot: kube-proxy's
# iptables mode (through iptables-nft) adds and removes a chain per endpoint all day long, and on a node with
# 20,000 chains each sync lists them all (140 ms, nft 1.0.6).  Kernel 6.18 (seen here) leaves the hook out of a
# DELCHAIN notification (and send one for each chain of a deleted table): a deletion counts when the backend last
# saw that chain as a base chain, since it may end a shadow; another chain's deletion takes nothing from portguard.
NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN = 3, 5
_CHAIN = frozenset({NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN})
NFTA_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK = 1, 3, 4
_NLMSG_HDR = struct.Struct("=IHHII")
_BURST = 64 * 1024
_NLA_HDR = struct.Struct("=HH")


def relevant(data: bytes, tables: frozenset[bytes] | None,
             base_chains: frozenset[tuple[bytes, bytes]] | None = None) -> bool:
    """Does this chunk of nf_tables notifications touch anything a sync must look at?

    ``tables=None`` means every change is relevant.  Otherwise changes to tables, rules, sets, objects and
    regular chains of other tables (Docker's filter rules, kube-proxy's chains, for example) are skipped; base
    chains anywhere (``base_chains``: those of other tables seen last, by (table, chain); None: every chain
    deletion counts) and anything not understood count.  The backstop sync covers whatever a filter could miss.
    """
    if tables is None or len(data) > _BURST or any(name in data for name in tables):
        # A burst (a flush of thousands of rules) wants a sync anyway, and parsing it message by
        # message would delay that sync by the parse time; a watched name anywhere is a quick yes.
        return True
    return _scan(data, tables, base_chains)[0]


def malformed(data: bytes) -> bool:
    """Is the chunk not a sequence of whole netlink messages (truncated, or lengths that don't add up)?"""
    return _scan(data, frozenset())[1]


def _scan(data: bytes, tables: frozenset[bytes],
          base_chains: frozenset[tuple[bytes, bytes]] | None = None) -> tuple[bool, bool]:
    """(relevant, malformed) for a chunk; a malformed chunk is always relevant: don't guess."""
    offset = 0
    hit = False
    while offset < len(data):
        if offset + _NLMSG_HDR.size > len(data):
            return True, True
        length, msg_type, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
        if length < _NLMSG_HDR.size or offset + length > len(data):
            return True, True
        subsys, msg = msg_type >> 8, msg_type & 0xFF
        if subsys == NFNL_SUBSYS_NFTABLES and msg != NFT_MSG_NEWGEN and not hit:
            attr = offset + _NLMSG_HDR.size + 4  # skip struct nfgenmsg
            if msg in _CHAIN:
                hit = _chain_counts(data, attr, offset + length, tables, deletion=msg == NFT_MSG_DELCHAIN,
                                    base_chains=base_chains)
            elif msg not in _PER_TABLE or attr + _NLA_HDR.size > offset + length:
                hit = True
            else:
                nla_len, nla_type = _NLA_HDR.unpack_from(data, attr)
                name = data[attr + _NLA_HDR.size : attr + nla_len].rstrip(b"\0")
                hit = (nla_type & 0x3FFF) != NFTA_TABLE or name in tables
        offset += (length + 3) & ~3
    return hit, False


def _chain_counts(data: bytes, attr: int, end: int, tables: frozenset[bytes], *, deletion: bool,
                  base_chains: frozenset[tuple[bytes, bytes]] | None) -> bool:
    """A chain message counts when its table is watched or it describes a base chain (NFTA_CHAIN_HOOK); a deletion
    also when it names one of ``base_chains`` or when those are not known (None).  Attributes that do not add up
    count too (don't guess)."""
    table = name = None
    while attr + _NLA_HDR.size <= end:
        nla_len, nla_type = _NLA_HDR.unpack_from(data, attr)
        if nla_len < _NLA_HDR.size or attr + nla_len > end:
            return True
        kind = nla_type & 0x3FFF
        if kind == NFTA_CHAIN_HOOK:
            return True
        if kind == NFTA_TABLE:
            table = data[attr + _NLA_HDR.size : attr + nla_len].rstrip(b"\0")
        elif kind == NFTA_CHAIN_NAME:
            name = data[attr + _NLA_HDR.size : attr + nla_len].rstrip(b"\0")
        attr += (nla_len + 3) & ~3
    if table is None or table in tables:
        return True
    return deletion and (base_chains is None or (table, name or b"") in base_chains)


class NftablesNotifications:
    """Requests a sync on every burst of nf_tables change notifications that could matter.

    Malformed or truncated messages (anything that is not whole netlink messages) are skipped,
    counted and still request a sync; nothing a socket delivers ends the watcher.
    """

    def __init__(
        self,
        request: Callable[[str], None],
        log: Logger,
        watch: Callable[[], Watch | None] = lambda: None,
        on_malformed: Callable[[], None] = lambda: None,
    ) -> None:
        self._request = request
        self._log = log
        self._watch = watch
        self._on_malformed = on_malformed
        self._sock: socket.socket | None = self._open()  # fails here when the kernel has no notifications

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setblocking(False)  # read when wait_readable says so: stop is seen without closing under a recv
        except OSError:
            sock.close()
            raise
        return sock

    def run(self, stop: threading.Event) -> None:
        if self._sock is None:
            self._sock = self._open()
            self._request("kernel.resubscribed")  # changes may have been missed while it was closed
        try:
            while wait_readable(stop, self._sock):
                try:
                    data = self._sock.recv(_CHUNK)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        self._reopen(exc, stop)
                    # Overrun or a lost subscription: changes may have been missed; sync.
                    self._request("kernel.overrun")
                    continue
                self._handle(data)
        finally:
            self._sock.close()
            self._sock = None

    def _handle(self, data: bytes) -> None:
        if not data:
            return
        if malformed(data):
            self._on_malformed()
            self._log.debug("kernel.malformed", size=len(data))
            self._request("kernel.malformed")
        elif self._relevant(data):
            self._request("kernel.nftables")

    def _relevant(self, data: bytes) -> bool:
        watch = self._watch()
        return relevant(data, None, None) if watch is None else relevant(data, watch.nf_tables, watch.base_chains)

    def _reopen(self, exc: OSError, stop: threading.Event) -> None:
        self._log.error("kernel.notifications_failed", error=str(exc), action="resubscribe")
        if self._sock is not None:
            self._sock.close()
        while not stop.wait(1.0):
            try:
                self._sock = self._open()
                return
            except OSError as again:
                self._log.debug("kernel.resubscribe_failed", error=str(again))


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
        self._table_family = Family.IPV6 if ipv6 else Family.IPV4

    def read(self) -> tuple[int, ...] | None:
        """The fingerprint, or None when there is no legacy nat table."""
        if not legacy_nat_registered(self._table_family):
            return None
        with socket.socket(self._family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            info = _GetInfo(name=b"nat")
            size = ctypes.c_uint(ctypes.sizeof(info))
            rc = _libc.getsockopt(sock.fileno(), self._level, IPT_SO_GET_INFO, ctypes.byref(info), ctypes.byref(size))
            if rc != 0:
                return None
            return (info.valid_hooks, *info.hook_entry, *info.underflow, info.num_entries, info.size)
