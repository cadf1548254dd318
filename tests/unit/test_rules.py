"""The rule model's identity: the mark hashes the spec and nothing else."""

from __future__ import annotations

from dataclasses import replace

from portguard.backends.nftables import render_table
from portguard.backends.xtables import full_plan, render_restore, rule_spec
from portguard.rules import Action, Family, PortRange, Protocol, Rule, is_mark

MASQ = Rule(Family.IPV4, Action.MASQUERADE, None, Protocol.TCP, PortRange(32768, 61000), PortRange(49152, 61000))
EXCL = Rule(Family.IPV4, Action.RETURN, out_interface="br-+")


def test_mark_is_stable_and_changes_with_the_spec() -> None:
    """Equal specs share a mark; a different target range gives a different one."""
    twin = Rule(Family.IPV4, Action.MASQUERADE, None, Protocol.TCP, PortRange(32768, 61000), PortRange(49152, 61000))
    other = Rule(Family.IPV4, Action.MASQUERADE, None, Protocol.TCP, PortRange(32768, 61000), PortRange(50000, 61000))
    assert MASQ.mark == twin.mark == "portguard:9782bbb8"
    assert MASQ.mark != other.mark
    assert len({MASQ.mark, EXCL.mark, Rule(Family.IPV6, Action.RETURN, out_interface="br-+").mark}) == 3


def test_iptables_rendering_matches_iptables_s_output() -> None:
    """Rules render exactly as `iptables -S` prints them."""
    assert rule_spec(MASQ) == (
        '-p tcp -m tcp --sport 32768:61000 -m comment --comment "portguard:9782bbb8" '
        "-j MASQUERADE --to-ports 49152-61000"
    )
    assert rule_spec(EXCL) == f'-o br-+ -m comment --comment "{EXCL.mark}" -j RETURN'


def test_restore_batch_creates_chains_before_jumping_to_them() -> None:
    """The full batch declares and fills both chains, then inserts the early jump at position 1 and appends the
    late jump at the end of POSTROUTING."""
    late = replace(MASQ, action=Action.SNAT, late=True)
    batch = render_restore([EXCL, MASQ, late], full_plan()).splitlines()
    assert batch[0] == "*nat" and batch[1] == ":PORTGUARD - [0:0]" and batch[-1] == "COMMIT"
    assert batch.index(":PORTGUARD-LATE - [0:0]") < batch.index(f"-A PORTGUARD-LATE {rule_spec(late)}")
    assert batch[-3].startswith("-I POSTROUTING 1 ") and batch[-3].endswith("-j PORTGUARD")
    assert batch[-2].startswith("-A POSTROUTING ") and batch[-2].endswith("-j PORTGUARD-LATE")


def test_nft_rendering_uses_star_wildcard_and_srcnat_minus_10() -> None:
    """The nft table hooks at srcnat - 10 and spells the interface wildcard with '*', as `nft list` prints it."""
    text = render_table([EXCL, MASQ])
    assert "type nat hook postrouting priority srcnat - 10; policy accept;" in text
    assert f'meta nfproto ipv4 oifname "br-*" return comment "{EXCL.mark}"' in text
    assert (
        "meta nfproto ipv4 tcp sport 32768-61000 counter packets 0 bytes 0 masquerade to :49152-61000 "
        f'comment "{MASQ.mark}"'
    ) in text


def test_port_only_and_address_snat_render_alike_in_every_syntax() -> None:
    """Host traffic: port-only SNAT (address kept); a host_ipv4 network: SNAT to that address; both with the port."""
    host = Rule(Family.IPV4, Action.SNAT, None, Protocol.TCP, PortRange(32768, 61000), PortRange(49152, 61000),
                local_source=True, fully_random=True)
    net6 = Rule(Family.IPV6, Action.SNAT, None, Protocol.TCP, PortRange(32768, 61000), PortRange(49152, 61000),
                source="fd00::/64", to_address="fd00::5")
    assert rule_spec(host) == (
        f'-p tcp -m tcp --sport 32768:61000 -m addrtype --src-type LOCAL -m comment --comment "{host.mark}" '
        "-j SNAT --to-source :49152-61000 --random-fully"
    )
    assert rule_spec(net6).startswith("-s fd00::/64 -p tcp") and rule_spec(net6).endswith(
        "-j SNAT --to-source [fd00::5]:49152-61000")
    text = render_table([host, net6])
    assert "fib saddr type local counter packets 0 bytes 0 snat to :49152-61000 fully-random" in text
    assert "ip6 saddr fd00::/64 tcp sport 32768-61000 counter packets 0 bytes 0 snat ip6 to [fd00::5]:49152-61000" \
        in text


def test_marks_are_exact() -> None:
    """Only 'portguard:' and exactly eight lowercase hex digits is a mark; look-alikes are foreign."""
    assert is_mark(MASQ.mark)
    for fake in ("portguard:deadbeef ", "portguard: manual seed, keep", "portguard:DEADBEEF", "portguard:dead",
                 "xportguard:deadbeef", "portguard:deadbeef0", None):
        assert not is_mark(fake), fake
