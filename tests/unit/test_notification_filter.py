"""The notification filter: which nf_tables messages can matter to portguard's rules."""

from __future__ import annotations

import struct

from portguard.watch.kernel import relevant

NEWTABLE, NEWCHAIN, NEWRULE, DELRULE, NEWGEN = 0, 3, 6, 8, 15


def _msg(kind: int, table: bytes | None = None) -> bytes:
    """One nf_tables netlink message as the kernel lays it out: nlmsghdr, nfgenmsg, NFTA_*_TABLE."""
    body = struct.pack("=BBH", 2, 0, 0)
    if table is not None:
        name = table + b"\0"
        attr = struct.pack("=HH", 4 + len(name), 1) + name
        body += attr + b"\0" * (-len(attr) % 4)
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | kind, 0, 0, 0) + body


ONLY_OURS = frozenset({b"portguard"})


def test_rules_of_other_tables_are_skipped() -> None:
    """Docker's filter-rule churn and generation markers alone never wake the runner."""
    chunk = _msg(NEWRULE, b"filter") + _msg(DELRULE, b"filter") + _msg(NEWGEN)
    assert not relevant(chunk, ONLY_OURS)


def test_rules_of_a_watched_table_and_any_table_or_chain_change_count() -> None:
    """A rule in portguard's table, a new chain anywhere (it may be a base chain), a table change: relevant."""
    assert relevant(_msg(NEWRULE, b"filter") + _msg(DELRULE, b"portguard"), ONLY_OURS)
    assert relevant(_msg(NEWCHAIN, b"early"), ONLY_OURS)
    assert relevant(_msg(NEWTABLE, b"anything"), ONLY_OURS)


def test_a_burst_counts_without_being_parsed() -> None:
    """A chunk beyond 64 KiB (a flush of many rules) requests a sync even if it only names other tables."""
    burst = _msg(DELRULE, b"filter") * 3000
    assert len(burst) > 64 * 1024 and relevant(burst, ONLY_OURS)
    assert not relevant(_msg(DELRULE, b"filter") * 100, ONLY_OURS)


def test_without_a_filter_and_on_malformed_input_everything_counts() -> None:
    """No table set: every chunk is relevant; a header claiming a length below its own size is not guessed at."""
    assert relevant(_msg(NEWRULE, b"filter"), None)
    assert relevant(struct.pack("=IHHII", 4, (10 << 8) | NEWRULE, 0, 0, 0), ONLY_OURS)
