"""ctnetlink messages: a dump's entries parsed as the kernel sends them; what is not whole is counted, skipped."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest

from portguard.ctnetlink import (
    CtnetlinkError,
    DumpStats,
    Entry,
    delete_message,
    done_message,
    entry_message,
    parse_entries,
)

STUCK = Entry(socket.AF_INET, "tcp", "SYN_SENT", True, "10.88.0.2", "198.51.100.2", 33000, 8080, 33000, 7, 0, 6)
TRANSLATED = Entry(socket.AF_INET, "tcp", "ESTABLISHED", False, "198.51.100.1", "198.51.100.2", 34000, 8080, 50123,
                   8, 0, 6)
V6_UDP = Entry(socket.AF_INET6, "udp", "", True, "2001:db8:100::1", "2001:db8:100::2", 35000, 53, 35000, 9, 0, 17)


def test_a_dump_parses_back_to_the_entries_that_made_it() -> None:
    """IPv4 and IPv6, TCP with its state and UDP without, replied or not, and the end of the dump."""
    data = entry_message(STUCK) + entry_message(TRANSLATED) + entry_message(V6_UDP) + done_message()
    stats = DumpStats()
    entries, done = parse_entries(data, stats)
    assert done and entries == [STUCK, TRANSLATED, V6_UDP] and (stats.entries, stats.malformed) == (3, 0)


def test_truncated_and_garbled_messages_are_counted_and_skipped() -> None:
    """A message cut short, one whose attribute lengths overrun, and a foreign message type: each counted once;
    the whole entries around them still parse."""
    good = entry_message(STUCK)
    garbled = bytearray(entry_message(TRANSLATED))
    garbled[16 + 4] = 0xFF  # the first attribute's length now runs past the message
    foreign = bytearray(entry_message(V6_UDP))
    foreign[4] = 0x05  # another subsystem's message type
    stats = DumpStats()
    entries, done = parse_entries(good + bytes(garbled) + bytes(foreign) + good[:40], stats)
    assert entries == [STUCK] and not done and stats.malformed == 3


def test_an_error_answer_is_an_error_not_an_empty_table() -> None:
    """NLMSG_ERROR with -EPERM (no CAP_NET_ADMIN) raises, so the caller falls back or reports."""
    error = (20 + 16).to_bytes(4, "little") + (2).to_bytes(2, "little") + b"\0" * 10 + (-1).to_bytes(4, "little",
                                                                                                  signed=True)
    with pytest.raises(CtnetlinkError):
        parse_entries(error + b"\0" * 16, DumpStats())


def test_a_delete_names_the_exact_tuple_and_the_id() -> None:
    """The delete carries the original tuple (both addresses and ports, the protocol) and CTA_ID."""
    msg = delete_message(STUCK, seq=5)
    assert socket.inet_aton(STUCK.src) in msg and socket.inet_aton(STUCK.dst) in msg
    assert (33000).to_bytes(2, "big") in msg and (7).to_bytes(4, "big") in msg
    assert int.from_bytes(msg[4:6], "little") == (1 << 8) | 2  # ctnetlink, IPCTNL_MSG_CT_DELETE


def test_where_ctnetlink_is_refused_conntrack_tools_is_read_instead(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Any) -> None:
    """EPERM on the netlink socket before any entry: the same flows come from `conntrack -L` (here a stand-in
    printing a real line), and the read says which interface it used."""
    from portguard import conntrack, ctnetlink
    from portguard.rules import Family, Protocol

    def refused(*_a: object, **_k: object) -> Any:
        raise ctnetlink.CtnetlinkError(errno.EPERM, "ctnetlink: Operation not permitted")

    tool = tmp_path / "conntrack"
    tool.write_text("#!/bin/sh\necho 'tcp      6 118 SYN_SENT src=10.88.0.2 dst=198.51.100.2 sport=33000 dport=8080 "
                    "[UNREPLIED] src=198.51.100.2 dst=10.88.0.2 sport=8080 dport=33000 mark=0 use=1'\n")
    tool.chmod(0o755)
    monkeypatch.setattr(ctnetlink, "dump", refused)
    monkeypatch.setattr(conntrack, "_tool", lambda: str(tool))
    stats = conntrack.ReadStats()
    flows = list(conntrack.iter_flows([Family.IPV4], [Protocol.TCP], stats=stats))
    assert stats.via == "conntrack" and [(f.src, f.sport, f.reply_dport, f.unreplied) for f in flows] == [
        ("10.88.0.2", 33000, 33000, True)]
