"""Conntrack healing over ctnetlink, in a namespace with real connections of every kind: exactly the stuck
untranslated ones go; translated ones and answered ones stay."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import apply, keep_conntrack_on
from netns import Netns, wait_for
from topology import ACL_LOW, OPEN_PORT, SERVER_IP, AclNetwork

pytestmark = pytest.mark.netns
BLACKHOLE = 9999  # the far side drops every SYN to this port, whatever its source port
OPEN = """
import socket, sys, time
socks = []
for _ in range(int(sys.argv[3])):
    s = socket.socket(); s.setblocking(False)
    try: s.connect((sys.argv[1], int(sys.argv[2])))
    except BlockingIOError: pass
    socks.append(s)
print("sent", flush=True); time.sleep(60)
"""
HEAL_JOB = {"kind": "heal", "families": ["ipv4", "ipv6"], "protocols": ["tcp"], "source": [32768, 61000],
            "target": [49152, 61000], "interfaces": [], "excluded": ["lo"]}


def _entries(ns: Netns, port: int) -> list[str]:
    out = ns.run(["conntrack", "-L", "-p", "tcp", "--dport", str(port)], check=False).stdout
    return [ln for ln in out.splitlines() if ln.startswith("tcp")]


def _identities(lines: list[str]) -> list[list[str]]:
    """Each entry as conntrack -L prints it, less what changes by itself: the seconds left (the third field) and
    the reference count."""
    return sorted([w for i, w in enumerate(ln.split()) if i != 2 and not w.startswith("use=")] for ln in lines)


def _open(ns: Netns, port: int, count: int) -> subprocess.Popen[str]:
    proc: subprocess.Popen[str] = ns.popen([sys.executable, "-c", OPEN, SERVER_IP, str(port), str(count)],
                                           stdout=subprocess.PIPE, text=True)  # type: ignore[call-overload]
    assert proc.stdout is not None and proc.stdout.readline() == "sent\n"
    return proc


def test_a_heal_deletes_exactly_the_stuck_untranslated_entries_over_ctnetlink(ns: Netns) -> None:
    """12 connections stuck untranslated (their SYNs dropped by the ACL), 5 untranslated but answered (no ACL on
    that port), 4 translated but unanswered (a port the far side drops): the heal deletes the 12 through
    ctnetlink, one by one by tuple; the others are as they were.  The stuck ones then complete translated."""
    acl = AclNetwork(ns, action="DROP")
    try:
        keep_conntrack_on(ns)
        acl.far.run(["iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", str(BLACKHOLE), "-j", "DROP"])
        stuck = _open(ns, 8080, 12)
        answered = _open(ns, OPEN_PORT, 5)
        assert wait_for(lambda: len(_entries(ns, 8080)) == 12 and len(_entries(ns, OPEN_PORT)) == 5, 5)
        apply(ns, "nftables")
        translated = _open(ns, BLACKHOLE, 4)
        assert wait_for(lambda: len(_entries(ns, BLACKHOLE)) == 4, 5)
        before_answered, before_translated = _entries(ns, OPEN_PORT), _entries(ns, BLACKHOLE)
        assert all("SYN_SENT" in ln and "UNREPLIED" in ln for ln in before_translated), before_translated
        assert not any("SYN_SENT" in ln or "UNREPLIED" in ln for ln in before_answered), before_answered
        child = ns.run([sys.executable, "-P", "-m", "portguard.effects"], input=json.dumps(HEAL_JOB))
        answer = json.loads(child.stdout)
        assert (answer["healed"], answer["via"], answer["malformed"]) == (12, "ctnetlink", 0), answer
        assert _identities(_entries(ns, OPEN_PORT)) == _identities(before_answered)
        assert _identities(_entries(ns, BLACKHOLE)) == _identities(before_translated)
        # the next SYN retransmission of each healed connection is translated and accepted
        assert wait_for(lambda: len(acl.ports) >= 12, 20), acl.ports
        assert min(acl.ports) >= ACL_LOW, acl.ports
        for proc in (stuck, answered, translated):
            proc.kill()
    finally:
        acl.close()
