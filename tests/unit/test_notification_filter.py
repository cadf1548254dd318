"""The notification filter: which nf_tables messages can matter to portguard's rules."""

from __future__ import annotations

import struct

from portguard.watch.kernel import relevant

NEWTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWGEN = 0, 3, 5, 6, 8, 15


def _attr(kind: int, value: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(value), kind) + value
    return attr + b"\0" * (-len(attr) % 4)


# NFTA_CHAIN_NAME, and a nested NFTA_CHAIN_HOOK (hook number, priority) as a base chain's message carries them
NAME = _attr(3, b"KUBE-SEP-ABCDEF\0")
HOOK = _attr(4 | 0x8000, _attr(1, struct.pack("!I", 4)) + _attr(2, struct.pack("!i", 100)))


def _msg(kind: int, table: bytes | None = None, extra: bytes = b"") -> bytes:
    """One nf_tables netlink message as the kernel lays it out: nlmsghdr, nfgenmsg, NFTA_*_TABLE, then ``extra``."""
    body = struct.pack("=BBH", 2, 0, 0)
    if table is not None:
        body += _attr(1, table + b"\0")
    body += extra
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | kind, 0, 0, 0) + body


ONLY_OURS = frozenset({b"portguard"})
BASE = frozenset({(b"nat", b"POSTROUTING")})  # base chains of other tables the backend saw last


def test_rules_of_other_tables_are_skipped() -> None:
    """Docker's filter-rule churn and generation markers alone never wake the runner."""
    chunk = _msg(NEWRULE, b"filter") + _msg(DELRULE, b"filter") + _msg(NEWGEN)
    assert not relevant(chunk, ONLY_OURS)


def test_rules_of_a_watched_table_base_chains_anywhere_and_table_changes_count() -> None:
    """A rule in portguard's table, a chain of it, a base chain anywhere (it may run first), a change of its
    table: relevant."""
    assert relevant(_msg(NEWRULE, b"filter") + _msg(DELRULE, b"portguard"), ONLY_OURS)
    assert relevant(_msg(NEWCHAIN, b"early", NAME + HOOK), ONLY_OURS)
    assert relevant(_msg(DELCHAIN, b"portguard", NAME), ONLY_OURS)
    assert relevant(_msg(NEWTABLE, b"portguard"), ONLY_OURS)


def test_regular_chains_of_other_tables_come_and_go_unnoticed() -> None:
    """kube-proxy's per-endpoint chains (iptables-nft, table ip nat, which it announces with each change): created
    and deleted without a hook, they cannot run before portguard's chain; a chain message whose attributes do not
    add up still counts."""
    churn = (_msg(NEWTABLE, b"nat") + _msg(NEWCHAIN, b"nat", NAME) + _msg(NEWRULE, b"nat")
             + _msg(DELCHAIN, b"nat", NAME) + _msg(NEWGEN))
    assert not relevant(churn, ONLY_OURS, BASE)
    assert relevant(_msg(NEWCHAIN, b"nat", struct.pack("=HH", 200, 3)), ONLY_OURS, BASE)


def test_deleting_a_base_chain_seen_last_counts_and_so_does_any_deletion_when_none_were_seen() -> None:
    """Kernel 6.18 sends DELCHAIN without the hook: the deletion of a chain the backend last saw as a base chain
    (it may have shadowed portguard's) counts by its name; where the backend does not say (None), every one does."""
    assert relevant(_msg(DELCHAIN, b"nat", _attr(3, b"POSTROUTING\0")), ONLY_OURS, BASE)
    assert not relevant(_msg(DELCHAIN, b"filter", _attr(3, b"POSTROUTING\0")), ONLY_OURS, BASE)
    assert relevant(_msg(DELCHAIN, b"nat", NAME), ONLY_OURS, None)


def test_a_burst_counts_without_being_parsed() -> None:
    """A chunk beyond 64 KiB (a flush of many rules) requests a sync even if it only names other tables."""
    burst = _msg(DELRULE, b"filter") * 3000
    assert len(burst) > 64 * 1024 and relevant(burst, ONLY_OURS)
    assert not relevant(_msg(DELRULE, b"filter") * 100, ONLY_OURS)


def test_without_a_filter_and_on_malformed_input_everything_counts() -> None:
    """No table set: every chunk is relevant; a header claiming a length below its own size is not guessed at."""
    assert relevant(_msg(NEWRULE, b"filter"), None)
    assert relevant(struct.pack("=IHHII", 4, (10 << 8) | NEWRULE, 0, 0, 0), ONLY_OURS)
