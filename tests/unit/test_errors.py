"""Error classification at the iptables boundary: a busy lock or a changed table means retry, never absent."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from portguard.backends.iptables_nft import IptablesNftBackend
from portguard.config import Config
from portguard.desired import desired_rules
from portguard.errors import FatalError, RetryableError, UnfixableError


class _Scripted(IptablesNftBackend):
    """iptables-nft with the process layer replaced by canned answers (the decisions stay real)."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]) -> None:
        super().__init__()
        self.answers = answers
        self.calls: list[list[str]] = []

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        key = "restore" if argv[0].endswith("-restore") else argv[-1]
        rc, out, err = self.answers.get(key, (0, "", ""))
        return subprocess.CompletedProcess(argv, rc, out, err)


RULES = desired_rules(Config())


def test_exit_status_4_while_listing_is_retry_not_absent() -> None:
    """`iptables -S` exiting 4 (lock or resource busy) raises RetryableError; no state is reported."""
    backend = _Scripted({"POSTROUTING": (4, "", "Another app is currently holding the xtables lock.")})
    with pytest.raises(RetryableError, match="xtables lock"):
        backend.observe(RULES)


def test_rejected_batch_because_the_table_changed_is_retry() -> None:
    """A restore that fails on a delete (the rule changed since we read) is retried, not fatal."""
    backend = _Scripted({"restore": (1, "", "iptables-nft-restore: line 3 failed: Bad rule (does a matching rule "
                                            "exist in that chain?).")})
    with pytest.raises(RetryableError):
        backend.ensure(RULES)


def test_exit_status_4_on_restore_is_retry_and_other_failures_are_fatal() -> None:
    """Exit 4 from the restore is retry; a syntax error is fatal and says what the tool said."""
    with pytest.raises(RetryableError):
        _Scripted({"restore": (4, "", "Resource temporarily unavailable")}).ensure(RULES)
    with pytest.raises(FatalError, match="unknown option"):
        _Scripted({"restore": (2, "", "iptables-nft-restore: unknown option --foo")}).ensure(RULES)


def test_an_absent_chain_is_absent_only_when_the_listing_succeeded() -> None:
    """POSTROUTING listed fine and PORTGUARD missing: absent (and a full plan), with the exact commands used."""
    missing = "iptables v1.8.9 (nf_tables): chain `{}' in table `nat' is incompatible, use 'nft' tool."
    backend = _Scripted({"PORTGUARD": (1, "", missing.format("PORTGUARD")),
                         "PORTGUARD-LATE": (1, "", missing.format("PORTGUARD-LATE"))})
    obs: Any = backend.observe(RULES)
    assert {s.state.value for s in obs.statuses} == {"absent"}
    assert [c[-1] for c in backend.calls] == ["POSTROUTING", "PORTGUARD", "PORTGUARD-LATE"] * 2


def test_a_kernel_refusal_is_unfixable_and_names_the_failing_line_not_the_banner() -> None:
    """EINVAL from the kernel (exit 4, like a busy lock) is not retried as 'busy': an UnfixableError carrying the
    line that failed, never the 'iptables-nft-restore v1.8.9 (nf_tables):' banner."""
    err = ("iptables-nft-restore v1.8.9 (nf_tables): \n"
           "line 3: RULE_APPEND failed (Invalid argument): rule in chain PORTGUARD\n")
    with pytest.raises(UnfixableError, match=r"line 3: RULE_APPEND failed \(Invalid argument\)"):
        _Scripted({"restore": (4, "", err)}).ensure(RULES)


def test_rules_iptables_nft_cannot_read_are_a_named_unfixable_condition() -> None:
    """An nft-native rule in ip nat makes `iptables-nft -S POSTROUTING` say 'incompatible': named, not fatal."""
    backend = _Scripted({"POSTROUTING": (1, "", "iptables v1.8.9 (nf_tables): chain `POSTROUTING' in table `nat' is "
                                                "incompatible, use 'nft' tool.")})
    with pytest.raises(UnfixableError, match="holds rules iptables-nft cannot read"):
        backend.observe(RULES)
