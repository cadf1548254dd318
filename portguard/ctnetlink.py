"""ctnetlink: conntrack's own netlink interface, for the effect worker's child (no conntrack-tools in the loop).

A dump (``IPCTNL_MSG_CT_GET`` with ``NLM_F_DUMP``) streams the table as netlink messages that are parsed as they
arrive, so the cost follows the table's size linearly and memory stays flat; a delete
(``IPCTNL_MSG_CT_DELETE``) names one entry by its exact original tuple and its ``CTA_ID``, so it is one hash
look-up in the kernel (conntrack-tools 1.4.7's ``-D`` walks the table for each line) and never takes an entry
that reuses the tuple.  Deletes go out in batches on a second socket while the dump goes on.

Layouts from linux/netfilter/nfnetlink_conntrack.h (stable ABI).  Nothing a socket delivers is trusted: a
message whose lengths do not add up is counted as malformed and skipped, never a reason to stop.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["CtnetlinkError", "Deleter", "DumpStats", "Entry", "delete_message", "done_message", "dump",
           "dump_request", "entry_message", "parse_entries"]

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_ID, CTA_ZONE = 1, 2, 3, 4, 12, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
IPS_SEEN_REPLY = 1 << 1
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT",
              "CLOSE", "SYN_SENT2")
PROTOCOLS = {6: "tcp", 17: "udp"}

_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_RECV = 1 << 20


class CtnetlinkError(OSError):
    """ctnetlink could not be asked (no CAP_NET_ADMIN, no conntrack in this kernel, an error answer)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One conntrack entry, reduced to what healing and the audit decide on."""

    family: int  # AF_INET / AF_INET6
    protocol: str
    state: str  # TCP state name ("" for UDP)
    unreplied: bool
    src: str
    dst: str
    sport: int
    dport: int
    reply_dport: int  # the port the remote side saw as the source
    ct_id: int
    zone: int
    proto_num: int


@dataclass
class DumpStats:
    entries: int = 0
    malformed: int = 0


def _attrs(data: memoryview) -> dict[int, memoryview] | None:
    """Top-level attributes of a region (type with the nested/byte-order flags cleared); None if malformed."""
    out: dict[int, memoryview] = {}
    offset, end = 0, len(data)
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            return None
        out[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out if offset >= end or end - offset < 4 else None


def _tuple(data: memoryview) -> tuple[str, str, int, int, int] | None:
    """(src, dst, protocol number, source port, destination port) of a CTA_TUPLE_* attribute."""
    top = _attrs(data)
    ip = _attrs(top[CTA_TUPLE_IP]) if top and CTA_TUPLE_IP in top else None
    proto = _attrs(top[CTA_TUPLE_PROTO]) if top and CTA_TUPLE_PROTO in top else None
    if not ip or not proto or CTA_PROTO_NUM not in proto:
        return None
    for family, size, src_kind, dst_kind in ((socket.AF_INET, 4, CTA_IP_V4_SRC, CTA_IP_V4_DST),
                                             (socket.AF_INET6, 16, CTA_IP_V6_SRC, CTA_IP_V6_DST)):
        if len(ip.get(src_kind, b"")) == size == len(ip.get(dst_kind, b"")):
            src, dst = socket.inet_ntop(family, ip[src_kind]), socket.inet_ntop(family, ip[dst_kind])
            break
    else:
        return None
    ports = [proto.get(k) for k in (CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT)]
    sport, dport = (struct.unpack(">H", p)[0] if p is not None and len(p) == 2 else 0 for p in ports)
    return src, dst, proto[CTA_PROTO_NUM][0], sport, dport


def _entry(family: int, payload: memoryview) -> Entry | None:
    attrs = _attrs(payload)
    if attrs is None or CTA_TUPLE_ORIG not in attrs or CTA_TUPLE_REPLY not in attrs:
        return None
    orig, reply = _tuple(attrs[CTA_TUPLE_ORIG]), _tuple(attrs[CTA_TUPLE_REPLY])
    if orig is None or reply is None:
        return None
    status = struct.unpack(">I", attrs[CTA_STATUS])[0] if len(attrs.get(CTA_STATUS, b"")) == 4 else 0
    state = ""
    info = _attrs(attrs[CTA_PROTOINFO]) if CTA_PROTOINFO in attrs else None
    tcp = _attrs(info[CTA_PROTOINFO_TCP]) if info and CTA_PROTOINFO_TCP in info else None
    if tcp and CTA_PROTOINFO_TCP_STATE in tcp and len(tcp[CTA_PROTOINFO_TCP_STATE]) == 1:
        index = tcp[CTA_PROTOINFO_TCP_STATE][0]
        state = TCP_STATES[index] if index < len(TCP_STATES) else str(index)
    ct_id = struct.unpack(">I", attrs[CTA_ID])[0] if len(attrs.get(CTA_ID, b"")) == 4 else 0
    zone = struct.unpack(">H", attrs[CTA_ZONE])[0] if len(attrs.get(CTA_ZONE, b"")) == 2 else 0
    return Entry(family, PROTOCOLS.get(orig[2], str(orig[2])), state, not status & IPS_SEEN_REPLY, orig[0], orig[1],
                 orig[3], orig[4], reply[4], ct_id, zone, orig[2])


def parse_entries(data: bytes, stats: DumpStats) -> tuple[list[Entry], bool]:
    """The conntrack entries in one chunk a dump socket delivered, and whether the dump is done.

    A message that is not whole or whose attributes don't add up is counted in ``stats.malformed`` and skipped;
    an error answer raises CtnetlinkError.
    """
    view = memoryview(data)
    out: list[Entry] = []
    offset = 0
    while offset + _NLMSG.size <= len(view):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(view, offset)
        if length < _NLMSG.size or offset + length > len(view):
            stats.malformed += 1
            return out, False
        body = view[offset + _NLMSG.size : offset + length]
        offset += (length + 3) & ~3
        if kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", body, 0)[0] if len(body) >= 4 else errno.EIO
            if code:
                raise CtnetlinkError(code, f"ctnetlink: {os.strerror(code)}")
            continue
        if kind >> 8 != NFNL_SUBSYS_CTNETLINK or kind & 0xFF != IPCTNL_MSG_CT_NEW or len(body) < _NFGEN.size:
            stats.malformed += 1
            continue
        family = body[0]
        entry = _entry(family, body[_NFGEN.size :])
        if entry is None:
            stats.malformed += 1
            continue
        stats.entries += 1
        out.append(entry)
    if offset < len(view):
        stats.malformed += 1
    return out, False


def _message(kind: int, flags: int, seq: int, family: int, attrs: bytes) -> bytes:
    body = _NFGEN.pack(family, 0, 0) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | kind, flags, seq, 0) + body


def _nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    raw = _NLA.pack(4 + len(payload), kind | (0x8000 if nested else 0)) + payload
    return raw + b"\0" * (-len(raw) % 4)


def dump_request(seq: int = 1, family: int = socket.AF_UNSPEC) -> bytes:
    """Every entry of ``family`` (AF_UNSPEC: all families)."""
    return _message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, b"")


def _tuple_attr(kind: int, family: int, proto_num: int, ends: tuple[str, str, int, int]) -> bytes:
    """CTA_TUPLE_ORIG or _REPLY: (source, destination, source port, destination port)."""
    src, dst, sport, dport = ends
    v4 = family == socket.AF_INET
    src_kind, dst_kind = (CTA_IP_V4_SRC, CTA_IP_V4_DST) if v4 else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    ip = _nla(src_kind, socket.inet_pton(family, src)) + _nla(dst_kind, socket.inet_pton(family, dst))
    proto = (_nla(CTA_PROTO_NUM, bytes([proto_num])) + _nla(CTA_PROTO_SRC_PORT, struct.pack(">H", sport))
             + _nla(CTA_PROTO_DST_PORT, struct.pack(">H", dport)))
    return _nla(kind, _nla(CTA_TUPLE_IP, ip, True) + _nla(CTA_TUPLE_PROTO, proto, True), True)


def entry_message(entry: Entry, seq: int = 0, *, reply_src: str | None = None) -> bytes:
    """The message a dump carries for ``entry`` (for benches and tests: synthetic tables)."""
    attrs = _tuple_attr(CTA_TUPLE_ORIG, entry.family, entry.proto_num, (entry.src, entry.dst, entry.sport, entry.dport))
    attrs += _tuple_attr(CTA_TUPLE_REPLY, entry.family, entry.proto_num,
                         (reply_src or entry.dst, entry.src, entry.dport, entry.reply_dport))
    attrs += _nla(CTA_STATUS, struct.pack(">I", 0 if entry.unreplied else IPS_SEEN_REPLY))
    if entry.state:
        state = _nla(CTA_PROTOINFO_TCP_STATE, bytes([TCP_STATES.index(entry.state)]))
        attrs += _nla(CTA_PROTOINFO, _nla(CTA_PROTOINFO_TCP, state, True), True)
    attrs += _nla(CTA_ID, struct.pack(">I", entry.ct_id))
    return _message(IPCTNL_MSG_CT_NEW, 0x2, seq, entry.family, attrs)  # NLM_F_MULTI


def done_message(seq: int = 0) -> bytes:
    return _NLMSG.pack(_NLMSG.size + 4, NLMSG_DONE, 0x2, seq, 0) + b"\0" * 4


def delete_message(entry: Entry, seq: int) -> bytes:
    """Delete exactly ``entry``: its original tuple, and its id (a new entry reusing the tuple stays)."""
    attrs = _tuple_attr(CTA_TUPLE_ORIG, entry.family, entry.proto_num, (entry.src, entry.dst, entry.sport, entry.dport))
    if entry.ct_id:
        attrs += _nla(CTA_ID, struct.pack(">I", entry.ct_id))
    if entry.zone:
        attrs += _nla(CTA_ZONE, struct.pack(">H", entry.zone))
    return _message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, entry.family, attrs)


def _socket(timeout: float) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        raise CtnetlinkError(exc.errno, f"ctnetlink: {exc.strerror}") from None
    try:
        sock.bind((0, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.settimeout(timeout)
    except OSError as exc:
        sock.close()
        raise CtnetlinkError(exc.errno, f"ctnetlink: {exc.strerror}") from None
    return sock


def dump(stats: DumpStats, *, deadline: float, recv: Callable[[socket.socket], bytes] | None = None,
         ) -> Iterator[Entry]:
    """Stream every conntrack entry; raises CtnetlinkError when refused or past ``deadline`` (monotonic)."""
    sock = _socket(max(0.1, deadline - time.monotonic()))
    read = recv or (lambda s: s.recv(_RECV))
    try:
        sock.send(dump_request())
        while True:
            if time.monotonic() > deadline:
                raise CtnetlinkError(errno.ETIMEDOUT, "ctnetlink: the dump did not finish in time")
            try:
                data = read(sock)
            except TimeoutError:
                raise CtnetlinkError(errno.ETIMEDOUT, "ctnetlink: the dump did not finish in time") from None
            except OSError as exc:
                raise CtnetlinkError(exc.errno, f"ctnetlink: {exc.strerror}") from None
            if not data:
                return
            entries, done = parse_entries(data, stats)
            yield from entries
            if done:
                return
    finally:
        sock.close()


class Deleter:
    """Deletes entries by exact tuple, ``batch`` messages per send, and counts what the kernel confirmed."""

    def __init__(self, *, batch: int = 256, timeout: float = 10.0) -> None:
        self._sock = _socket(timeout)
        self._batch = batch
        self._pending: list[bytes] = []
        self._seq = 0
        self.deleted = 0
        self.gone = 0  # already gone (answered, timed out) by the time the delete arrived

    def add(self, entry: Entry) -> None:
        self._seq += 1
        self._pending.append(delete_message(entry, self._seq))
        if len(self._pending) >= self._batch:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        count, payload = len(self._pending), b"".join(self._pending)
        self._pending = []
        try:
            self._sock.send(payload)
            acks = 0
            while acks < count:
                data = memoryview(self._sock.recv(_RECV))
                offset = 0
                while offset + _NLMSG.size <= len(data):
                    length, kind = _NLMSG.unpack_from(data, offset)[:2]
                    if length < _NLMSG.size or offset + length > len(data):
                        break
                    if kind == NLMSG_ERROR and length >= _NLMSG.size + 4:
                        acks += 1
                        code = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                        if code == 0:
                            self.deleted += 1
                        elif code == errno.ENOENT:
                            self.gone += 1
                        else:
                            raise CtnetlinkError(code, f"ctnetlink delete: {os.strerror(code)}")
                    offset += (length + 3) & ~3
        except TimeoutError:
            raise CtnetlinkError(errno.ETIMEDOUT, "ctnetlink: deletes were not answered in time") from None
        except OSError as exc:
            if isinstance(exc, CtnetlinkError):
                raise
            raise CtnetlinkError(exc.errno, f"ctnetlink: {exc.strerror}") from None

    def close(self) -> None:
        self._sock.close()
