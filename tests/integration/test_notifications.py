"""The notification filter against messages the kernel really sends for real changes."""

from __future__ import annotations

import sys

import pytest
from helpers import apply
from netns import Netns

pytestmark = pytest.mark.netns

PROBE = """
import socket, subprocess, sys
from portguard.watch.kernel import NftablesNotifications, relevant
sock = NftablesNotifications._open()
subprocess.run(sys.argv[2:], check=True, capture_output=True)
chunks = []
sock.settimeout(0.3)
try:
    while True:
        chunks.append(sock.recv(1 << 20))
except TimeoutError:
    pass
tables = frozenset(sys.argv[1].encode().split(b",")) if sys.argv[1] else None
print(len(chunks), any(relevant(c, tables) for c in chunks))
"""


def _seen(ns: Netns, tables: str, *cmd: str) -> tuple[int, bool]:
    count, hit = ns.run([sys.executable, "-c", PROBE, tables, *cmd]).stdout.split()
    return int(count), hit == "True"


def test_real_kernel_messages_are_classified(ns: Netns) -> None:
    """Docker-like filter rules are skipped for the nftables backend, but a deleted portguard rule, a flushed
    nat table (iptables-nft backend) and a new chain anywhere are seen."""
    apply(ns, "nftables")
    ns.run(["iptables-nft", "-A", "FORWARD", "-j", "ACCEPT"])  # the filter table exists from here on
    count, hit = _seen(ns, "portguard", "iptables-nft", "-A", "FORWARD", "-s", "10.1.0.0/16", "-j", "DROP")
    assert count >= 1 and not hit  # the kernel did notify; the filter skipped it
    assert _seen(ns, "portguard", "nft", "flush", "chain", "inet", "portguard", "postrouting")[1]
    ns.run(["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE"])
    assert _seen(ns, "nat", "iptables-nft", "-t", "nat", "-F")[1]
    assert not _seen(ns, "nat", "iptables-nft", "-A", "FORWARD", "-s", "10.2.0.0/16", "-j", "DROP")[1]
    assert _seen(ns, "portguard", "nft", "add table ip early; add chain ip early post "
                                         "{ type nat hook postrouting priority 0; }")[1]
    assert _seen(ns, "", "iptables-nft", "-A", "FORWARD", "-s", "10.3.0.0/16", "-j", "DROP")[1]
