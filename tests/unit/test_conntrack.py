"""Conntrack parsing and the choice of entries to heal: only stuck, untranslated, unreplied ones."""

from __future__ import annotations

from portguard.conntrack import parse_flows, untranslated
from portguard.rules import PortRange

LISTING = """\
tcp      6 118 SYN_SENT src=198.51.100.1 dst=198.51.100.2 sport=35000 dport=8080 [UNREPLIED] src=198.51.100.2 dst=198.51.100.1 sport=8080 dport=35000 mark=0 use=1
tcp      6 118 SYN_SENT src=198.51.100.1 dst=198.51.100.2 sport=35001 dport=8080 [UNREPLIED] src=198.51.100.2 dst=198.51.100.1 sport=8080 dport=50123 mark=0 use=1
tcp      6 431999 ESTABLISHED src=198.51.100.1 dst=198.51.100.2 sport=35002 dport=8080 src=198.51.100.2 dst=198.51.100.1 sport=8080 dport=35002 [ASSURED] mark=0 use=1
tcp      6 118 SYN_SENT src=198.51.100.1 dst=198.51.100.2 sport=50500 dport=8080 [UNREPLIED] src=198.51.100.2 dst=198.51.100.1 sport=8080 dport=50500 mark=0 use=1
udp      17 29 src=198.51.100.1 dst=198.51.100.2 sport=36000 dport=53 [UNREPLIED] src=198.51.100.2 dst=198.51.100.1 sport=53 dport=36000 mark=0 use=1
tcp      6 118 SYN_SENT src=198.51.100.1 dst=198.51.100.2 sport=1024 dport=8080 [UNREPLIED] src=198.51.100.2 dst=198.51.100.1 sport=8080 dport=1024 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 6 flow entries have been shown.
"""


def test_parse_reads_both_directions_and_state() -> None:
    """Each line gives the original tuple, the state, the unreplied flag and the reply's port."""
    flows = parse_flows(LISTING)
    assert len(flows) == 6
    first = flows[0]
    assert (first.protocol, first.state, first.unreplied, first.sport, first.reply_dport) == (
        "tcp", "SYN_SENT", True, 35000, 35000)
    assert flows[2].state == "ESTABLISHED" and not flows[2].unreplied
    assert flows[4].protocol == "udp" and flows[4].unreplied


def test_only_stuck_untranslated_flows_in_the_matched_range_are_chosen() -> None:
    """Translated, established, already-allowed and out-of-range flows are left alone."""
    chosen = untranslated(parse_flows(LISTING), PortRange(32768, 61000), PortRange(49152, 61000))
    assert [(f.protocol, f.sport) for f in chosen] == [("tcp", 35000), ("udp", 36000)]
    assert chosen[0].delete_args() == ["-p", "tcp", "-s", "198.51.100.1", "-d", "198.51.100.2", "--sport", "35000",
                                       "--dport", "8080"]
