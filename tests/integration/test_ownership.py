"""Prevention: under `portguard run` the nftables table is owned by the daemon's netlink socket (`flags owner`), so
the kernel refuses other processes' changes; a standby table keeps the rules in force when the daemon is gone."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from daemonproc import PortguardDaemon
from helpers import NFT_RULES, delete_rule, owned_lines
from netns import Netns, wait_for
from topology import ACL_LOW, AclNetwork

pytestmark = pytest.mark.netns
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def _start(daemons: list[PortguardDaemon], ns: Netns, tmp_path: Path, *args: str) -> PortguardDaemon:
    d = PortguardDaemon(ns, tmp_path, *args, env=NO_DOCKER)
    daemons.append(d)
    assert d.wait_note("READY=1"), d.log_path.read_text()
    return d


def _listing(ns: Netns) -> str:
    return ns.nft("list", "table", "inet", "portguard")


def _translated(acl: AclNetwork) -> bool:
    return acl.connect() and acl.ports[-1] >= ACL_LOW


def test_other_processes_cannot_break_the_owned_table(ns: Netns, acl: AclNetwork, tmp_path: Path,
                                                      daemons: list[PortguardDaemon]) -> None:
    """With `run` up: `nft flush ruleset`, `nft delete table`, deleting one of its rules and adding a rule to its
    chain all leave the table as it was, and connections keep being translated; no repair was needed."""
    d = _start(daemons, ns, tmp_path)
    before = _listing(ns)
    assert "flags owner" in before
    ns.nft("flush", "ruleset")  # returns 0 and leaves the owned table
    assert ns.run(["nft", "delete", "table", "inet", "portguard"], check=False).returncode == 1
    assert not delete_rule(ns, "nftables", check=False)
    added = ns.run(["nft", "add", "rule", "inet", "portguard", "postrouting", "counter", "accept"], check=False)
    assert added.returncode == 1 and "Operation not permitted" in added.stderr
    assert ns.run(["nft", "add", "table", "inet", "portguard", "{ flags dormant; }"], check=False).returncode == 1
    assert _listing(ns) == before
    assert _translated(acl)
    time.sleep(0.3)
    installed = [e for e in d.named("rule.installed") if any(r.startswith("ipv4") for r in e["rules"])]
    repaired = [e for e in d.named("rule.repaired") if any(r.startswith("ipv4") for r in e["rules"])]
    assert len(installed) == 1 and repaired == [], repaired  # the start-up install, nothing since
    assert ns.portguard("check").returncode == 0


def test_kill_9_leaves_the_standby_translating_and_a_restart_takes_over_without_a_gap(
        ns: Netns, acl: AclNetwork, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """kill -9: the owned table goes with its owner, the standby keeps translating; a new daemon takes over while
    a probe connects every 50 ms, and not one probe fails; one copy of each rule in each table afterwards."""
    first = _start(daemons, ns, tmp_path)
    first.stop(signal.SIGKILL)
    assert wait_for(lambda: ns.run(["nft", "list", "table", "inet", "portguard"], check=False).returncode != 0, 5)
    assert _translated(acl)
    assert ns.portguard("check").returncode == 0  # in force through the standby
    results: list[bool] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            results.append(acl.connect(timeout=2))
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.3)
        _start(daemons, ns, tmp_path)
        time.sleep(0.5)
    finally:
        stop.set()
        prober.join()
    assert results and all(results), results
    assert "flags owner" in _listing(ns)
    for table in ("portguard", "portguard_standby"):
        lines = owned_lines(ns, "nftables", table=table)
        assert len(lines) == len(set(lines)) == NFT_RULES, (table, lines)


def test_apply_and_remove_while_a_daemon_owns_the_table(ns: Netns, tmp_path: Path,
                                                        daemons: list[PortguardDaemon]) -> None:
    """apply is a no-op that says so (exit 0); remove says in one line who owns the table and how to stop it
    (exit 2) and removes nothing; a second daemon is refused."""
    _start(daemons, ns, tmp_path)
    before = ns.nft("list", "ruleset")
    applied = ns.portguard("apply")
    assert applied.returncode == 0 and "owned by the running portguard daemon" in applied.stdout, applied.stdout
    removed = ns.portguard("remove")
    assert removed.returncode == 2 and removed.stderr.count("\n") == 1, removed.stderr
    assert "owned by a running 'portguard run'" in removed.stderr and "systemctl stop portguard" in removed.stderr
    assert ns.nft("list", "ruleset") == before
    second = ns.portguard("run", env=NO_DOCKER, timeout=20)
    assert second.returncode == 2 and ns.nft("list", "ruleset") == before


def test_sigterm_leaves_the_standby_and_cleanup_on_exit_takes_both(ns: Netns, acl: AclNetwork, tmp_path: Path,
                                                                   daemons: list[PortguardDaemon]) -> None:
    """SIGTERM: the owned table goes, the standby stays and translates; --cleanup-on-exit removes both tables."""
    d = _start(daemons, ns, tmp_path)
    assert d.stop(signal.SIGTERM)[0] == 0
    assert owned_lines(ns, "nftables") == []
    assert len(owned_lines(ns, "nftables", table="portguard_standby")) == NFT_RULES
    assert _translated(acl)
    d = _start(daemons, ns, tmp_path, "--cleanup-on-exit")
    assert d.stop(signal.SIGTERM)[0] == 0
    assert owned_lines(ns, "nftables") == [] and owned_lines(ns, "nftables", table="portguard_standby") == []
    assert not acl.connect()


def test_doctor_reports_ownership(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """doctor says who owns the table while a daemon runs."""
    _start(daemons, ns, tmp_path)
    proc = ns.portguard("doctor", env=NO_DOCKER)
    assert "owned by a running portguard" in proc.stdout, proc.stdout


def test_run_survives_when_the_standby_is_attacked(ns: Netns, tmp_path: Path,
                                                   daemons: list[PortguardDaemon]) -> None:
    """The standby is an ordinary table: deleting it is repaired at once while the owned table keeps deciding."""
    d = _start(daemons, ns, tmp_path)
    ns.nft("delete", "table", "inet", "portguard_standby")
    assert wait_for(lambda: len(owned_lines(ns, "nftables", table="portguard_standby")) == NFT_RULES, 2)
    assert d.proc.poll() is None


def test_owned_table_survives_a_hostile_burst(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """A burst of flushes from another process: the owned table's listing never changes."""
    _start(daemons, ns, tmp_path)
    before = _listing(ns)
    burst = ns.run(["sh", "-c", "for i in $(seq 50); do nft flush ruleset; done"])
    assert burst.returncode == 0
    assert _listing(ns) == before
