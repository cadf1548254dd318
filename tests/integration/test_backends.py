"""Each backend against the real kernel tables, in a namespace the test creates and removes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    BACKENDS,
    DOCKER_RULE,
    HOST_RULE,
    IPTABLES_BACKENDS,
    JUMP,
    NFT_RULES,
    XT_V4_LINES,
    apply,
    bystander_setup,
    bystander_snapshot,
    check,
    delete_rule,
    owned_lines,
    postrouting,
    states,
    xt,
)
from netns import Netns

pytestmark = pytest.mark.netns

# Holds the lock in this very process, so ending it by PID releases the lock (flock(1) would leave
# its child holding it).
HOLD_LOCK = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
    "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_makes_check_healthy_with_one_line(ns: Netns, backend: str) -> None:
    """After apply, check exits 0 and prints a single clear line."""
    assert check(ns, backend)[0] == 1
    apply(ns, backend)
    proc = ns.portguard("check", "--backend", backend)
    assert proc.returncode == 0, proc.stdout
    rules = NFT_RULES // 2 if backend == "iptables-legacy" else NFT_RULES  # legacy: no ip6 nat registered, IPv4 only
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(f"healthy: {rules} rules"), proc.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_nat_flush_is_drift_then_repaired(ns: Netns, backend: str) -> None:
    """`iptables -t nat -F` breaks the iptables backends (check 1, apply repairs); nftables is untouched."""
    apply(ns, backend)
    ns.run([xt(backend), "-t", "nat", "-F"])
    code, report = check(ns, backend)
    if backend == "nftables":
        assert code == 0, report
        return
    assert code == 1 and states(report, "ipv4") == {"absent"}, report
    apply(ns, backend)
    assert check(ns, backend)[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nft_flush_ruleset_is_drift_then_repaired(ns: Netns, backend: str) -> None:
    """`nft flush ruleset` removes nftables and iptables-nft rules (then repaired); legacy tables stay."""
    apply(ns, backend)
    ns.nft("flush", "ruleset")
    code, report = check(ns, backend)
    if backend == "iptables-legacy":
        assert code == 0, report
        return
    assert code == 1 and "absent" in states(report), report
    apply(ns, backend)
    assert check(ns, backend)[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_deleted_rule_is_absent_then_repaired(ns: Netns, backend: str) -> None:
    """Deleting portguard's MASQUERADE by hand makes exactly that rule absent; apply restores it."""
    apply(ns, backend)
    delete_rule(ns, backend)
    code, report = check(ns, backend)
    assert code == 1
    absent = [r["rule"] for r in report["rules"] if r["state"] == "absent"]  # type: ignore[union-attr, index]
    assert absent == [HOST_RULE], report
    apply(ns, backend)
    assert check(ns, backend)[0] == 0
    assert len(owned_lines(ns, backend)) == (NFT_RULES if backend == "nftables" else XT_V4_LINES)


@pytest.mark.parametrize("backend", IPTABLES_BACKENDS)
def test_docker_rule_inserted_above_is_shadowed_then_first_again(ns: Netns, backend: str) -> None:
    """A Docker-style MASQUERADE inserted at position 1 shadows the rule; apply puts portguard first again."""
    apply(ns, backend)
    ns.run([xt(backend), *DOCKER_RULE])
    code, report = check(ns, backend)
    # (IPv6 is untouched by an ip nat rule; the legacy backend has no IPv6 here at all; the late chain is meant to
    # run after Docker's rules)
    assert code == 1 and states(report, "ipv4", "early") == {"shadowed"}, report
    assert states(report, "ipv4", "late") == {"healthy"} and states(report, "ipv6") <= {"healthy"}, report
    assert any("172.18.0.0/16" in s for s in report["shadowed_by"]), report  # type: ignore[union-attr]
    apply(ns, backend)
    rules = postrouting(ns, xt(backend))
    assert JUMP.search(rules[0]) and "172.18.0.0/16" in rules[1], rules
    assert check(ns, backend)[0] == 0


def test_nftables_is_not_shadowed_by_xtables_but_by_an_earlier_nft_chain(ns: Netns) -> None:
    """Docker's rules in either xtables flavour run after srcnat-10; an nft nat chain at priority 0 runs before."""
    apply(ns, "nftables")
    ns.run(["iptables-nft", *DOCKER_RULE])
    ns.run(["iptables-legacy", *DOCKER_RULE])
    assert check(ns, "nftables")[0] == 0
    ns.nft("add table ip early; add chain ip early post { type nat hook postrouting priority 0; }")
    code, report = check(ns, "nftables")
    assert code == 1 and states(report, "ipv4", "early") == {"shadowed"}, report
    assert states(report, "ipv4", "late") == states(report, "ipv6") == {"healthy"}, report
    assert report["shadowed_by"] == ["ip early post (priority 0)"], report
    before = ns.nft("list", "table", "inet", "portguard")
    assert ns.portguard("apply", "--backend", "nftables").returncode == 1  # unfixable: reported, never fought
    assert ns.nft("list", "table", "inet", "portguard") == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_become_one_and_unmarked_copies_stay(ns: Netns, backend: str) -> None:
    """Two copies of an owned rule (crash mid-apply, copied ruleset) become one; unmarked twins are untouched."""
    apply(ns, backend)
    bystander_setup(ns)
    before = bystander_snapshot(ns)
    if backend == "nftables":
        listing = ns.nft("list", "chain", "inet", "portguard", "postrouting")
        host = next(ln.strip() for ln in listing.splitlines() if "fib saddr type local" in ln)
        host = host.replace("packets 0 bytes 0 ", "")
        ns.nft(f"add rule inet portguard postrouting {host}")
    else:
        tool = xt(backend)
        jump = next(ln for ln in postrouting(ns, tool) if JUMP.search(ln))
        ns.run([tool, "-t", "nat", *jump.replace("-A POSTROUTING", "-I POSTROUTING 2").split()])
        host = next(ln for ln in ns.rules(f"{tool}-save") if "-A PORTGUARD " in ln and "SNAT" in ln)
        ns.run([tool, "-t", "nat", *host.replace('"', "").split()])
    code, report = check(ns, backend)
    assert code == 1 and "duplicated" in states(report), report
    apply(ns, backend)
    assert check(ns, backend)[0] == 0
    lines = owned_lines(ns, backend)
    assert len(lines) == len(set(lines)), lines
    assert bystander_snapshot(ns) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_config_change_removes_the_old_variant(ns: Netns, backend: str, tmp_path: Path) -> None:
    """Changing the target range installs the new rule and removes the old one in the same sync."""
    apply(ns, backend)
    old = set(owned_lines(ns, backend))
    cfg = tmp_path / "pg.toml"
    cfg.write_text('to_ports = "50000-60000"\nprotocols = ["tcp", "udp"]\n')
    code, report = check(ns, backend, "--config", str(cfg))
    assert code == 1 and report["stale"], report
    apply(ns, backend, "--config", str(cfg))
    assert check(ns, backend, "--config", str(cfg))[0] == 0
    new = owned_lines(ns, backend)
    gone = {ln for ln in old if "49152" in ln or (backend == "nftables" and ln not in new)}
    assert gone and not gone & set(new), (old, new)
    assert check(ns, backend)[0] == 1  # the old config now sees its rule missing


@pytest.mark.parametrize("backend", BACKENDS)
def test_bystander_rules_identical_through_every_operation(ns: Netns, backend: str, tmp_path: Path) -> None:
    """Foreign nat and filter rules (above, below, other chains) survive apply, check, change, remove unchanged."""
    bystander_setup(ns)
    ns.run([xt(backend), *DOCKER_RULE])
    before = bystander_snapshot(ns)
    cfg = tmp_path / "pg.toml"
    cfg.write_text('to_ports = "50000-60000"\n')
    steps = [
        ("apply", "--backend", backend),
        ("check", "--backend", backend),
        ("apply", "--backend", backend, "--config", str(cfg)),
        ("remove", "--backend", backend),
    ]
    for step in steps:
        proc = ns.portguard(*step)
        assert proc.returncode in (0, 1), proc.stderr
        assert bystander_snapshot(ns) == before, step
    assert owned_lines(ns, backend) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_deletes_only_what_portguard_owns(ns: Netns, backend: str) -> None:
    """remove leaves no owned object and a second remove is a no-op."""
    apply(ns, backend)
    assert ns.portguard("remove", "--backend", backend).returncode == 0
    assert owned_lines(ns, backend) == []
    assert ns.portguard("remove", "--backend", backend).returncode == 0


@pytest.mark.parametrize("backend", IPTABLES_BACKENDS)
def test_busy_xtables_lock_never_means_absent_nor_a_second_copy(ns: Netns, backend: str, tmp_path: Path) -> None:
    """While another process holds the xtables lock: check still says healthy, apply adds no copy; a blocked
    legacy write fails as a retryable error and succeeds once the lock is free."""
    lock = str(tmp_path / "xtables.lock")
    env = {"XTABLES_LOCKFILE": lock}
    apply(ns, backend)
    holder = ns.popen([sys.executable, "-c", HOLD_LOCK, lock], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    assert ns.portguard("check", "--backend", backend, env=env).returncode == 0
    assert ns.portguard("apply", "--backend", backend, env=env).returncode == 0
    ns.run([xt(backend), "-t", "nat", "-F", "PORTGUARD"])  # the rule goes while the lock is held
    proc = ns.portguard("apply", "--backend", backend, env=env)
    if backend == "iptables-legacy":
        assert proc.returncode == 2 and "lock" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr  # nf_tables transactions don't use the xtables lock
    holder.terminate()
    holder.wait()
    assert ns.portguard("apply", "--backend", backend, env=env).returncode == 0
    lines = owned_lines(ns, backend)
    assert len(lines) == XT_V4_LINES and len(set(lines)) == XT_V4_LINES, lines


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(ns: Netns, backend: str, tmp_path: Path) -> None:
    """An invalid value names its key on one line, exits 2, and leaves the kernel tables untouched."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text('to_ports = "61000-49152"\n')
    proc = ns.portguard("apply", "--backend", backend, "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "to_ports" in proc.stderr, proc.stderr
    assert owned_lines(ns, backend) == []


def test_forcing_a_flavour_other_than_dockers_is_drift(ns: Netns) -> None:
    """Docker's chain in legacy nat and a forced iptables-nft backend: check exits 1 and says why."""
    ns.run(["iptables-legacy", "-t", "nat", "-N", "DOCKER"])
    apply(ns, "iptables-nft", expect=1)
    proc = ns.portguard("check", "--backend", "iptables-nft")
    assert proc.returncode == 1
    assert "conflict: Docker writes iptables-legacy but backend iptables-nft was forced" in proc.stdout
    assert ns.portguard("check", "--backend", "iptables-legacy").returncode == 1  # not applied there: absent
    assert ns.portguard("apply", "--backend", "iptables-legacy").returncode == 0
    assert ns.portguard("check", "--backend", "iptables-legacy").returncode == 0


def test_missing_tools_are_one_line_naming_the_package(ns: Netns) -> None:
    """With no iptables binaries on PATH, a forced iptables-nft backend fails in one line naming the package."""
    proc = ns.run(["env", "PATH=/nonexistent", sys.executable, "-m", "portguard", "check", "--backend", "iptables-nft"],
                  check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "portguard: error: backend iptables-nft: iptables-nft, iptables-nft-restore not found; "
        "install the 'iptables' package"
    )


def test_without_cap_net_admin_commands_say_so_in_one_line(ns: Netns) -> None:
    """An unprivileged check is one clear line and exit 2; render needs no privilege."""
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "portguard"]
    proc = ns.run([*argv, "check"], check=False, env={"PORTGUARD_CONFIG": "/dev/null", "PATH": "/usr/sbin:/usr/bin"})
    assert proc.returncode == 2
    assert proc.stderr == "portguard: error: check needs CAP_NET_ADMIN to read netfilter tables; run it as root\n"
    shown = ns.run([*argv, "render", "--backend", "nftables"], check=False, env={"PORTGUARD_CONFIG": "/dev/null"})
    assert shown.returncode == 0 and shown.stdout.startswith("table inet portguard {")
