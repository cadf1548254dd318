"""Hostile and unlucky neighbours: nothing foreign is taken for portguard's, nothing that switches the rules off
goes unseen, and what the kernel holds after apply is exactly what render printed."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from daemonproc import PortguardDaemon
from helpers import BACKENDS, IPTABLES_BACKENDS, apply, check, xt
from netns import Netns, wait_for

pytestmark = pytest.mark.netns
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
LOOK_ALIKES = [
    ["-m", "comment", "--comment", "portguard:deadbeef", "-j", "ACCEPT"],
    ["-s", "10.1.0.0/16", "-m", "comment", "--comment", "portguard: manual seed, keep", "-j", "MASQUERADE"],
    ["-d", "10.2.0.0/16", "-m", "comment", "--comment", "portguard:0badc0de", "-j", "RETURN"],
]


@pytest.mark.parametrize("backend", IPTABLES_BACKENDS)
def test_look_alike_comments_in_postrouting_survive_apply_and_remove(ns: Netns, backend: str) -> None:
    """Foreign POSTROUTING rules whose comments look like portguard's stay through apply, check and remove."""
    tool = xt(backend)
    for spec in LOOK_ALIKES:
        ns.run([tool, "-t", "nat", "-A", "POSTROUTING", *spec])
    foreign = [ln for ln in ns.rules(f"{tool}-save") if "PORTGUARD" not in ln]
    apply(ns, backend)
    assert check(ns, backend)[0] == 0
    assert ns.portguard("remove", "--backend", backend).returncode == 0
    assert [ln for ln in ns.rules(f"{tool}-save") if "PORTGUARD" not in ln] == foreign


def test_dormant_table_is_drift_and_apply_wakes_it(ns: Netns) -> None:
    """`flags dormant` keeps the rules listed but inactive: check exits 1 naming it, apply clears it."""
    apply(ns, "nftables")
    ns.nft("add", "table", "inet", "portguard", "{ flags dormant; }")
    code, report = check(ns, "nftables")
    assert code == 1 and {r["state"] for r in report["rules"]} == {"dormant"}, report  # type: ignore[index]
    apply(ns, "nftables")
    assert "dormant" not in ns.nft("list", "table", "inet", "portguard")
    assert check(ns, "nftables")[0] == 0


def test_a_dormant_standby_is_repaired_by_the_daemon(ns: Netns, tmp_path: Path) -> None:
    """The standby is not owned: switching it off is repaired at once by `portguard run`."""
    d = PortguardDaemon(ns, tmp_path, env=NO_DOCKER)
    try:
        assert d.wait_note("READY=1"), d.log_path.read_text()
        ns.nft("add", "table", "inet", "portguard_standby", "{ flags dormant; }")
        assert wait_for(lambda: "dormant" not in ns.nft("list", "table", "inet", "portguard_standby"), 2)
    finally:
        d.close()


@pytest.mark.parametrize("how", ["nft", "iptables-nft", "iptables-legacy"])
def test_notrack_bypass_is_reported_by_check_and_doctor(ns: Netns, how: str) -> None:
    """A notrack rule before conntrack (raw priority) makes matched connections skip NAT: check and apply exit 1
    with a 'bypass:' line, doctor names it as a risk; none touches it."""
    apply(ns, "nftables")
    if how == "nft":
        ns.nft("add table ip raw2; add chain ip raw2 out { type filter hook output priority raw; }; "
               "add rule ip raw2 out tcp sport 32768-61000 notrack")
    else:
        ns.run([how, "-t", "raw", "-A", "OUTPUT", "-p", "tcp", "--sport", "32768:61000", "-j", "CT", "--notrack"])
    before = ns.nft("list", "ruleset")
    proc = ns.portguard("check", "--backend", "nftables")
    assert proc.returncode == 1 and "bypass:" in proc.stdout and "notrack skips NAT" in proc.stdout, proc.stdout
    applied = ns.portguard("apply", "--backend", "nftables")  # the README: 1, something it must not touch
    assert applied.returncode == 1 and "notrack skips NAT" in applied.stdout, applied.stdout
    doctor = ns.portguard("doctor", env=NO_DOCKER)
    assert doctor.returncode == 1 and "RISK bypass" in doctor.stdout, doctor.stdout
    assert ns.nft("list", "ruleset") == before


def test_nft_native_rule_in_ip_nat_is_a_named_condition_not_a_crash(ns: Netns, tmp_path: Path) -> None:
    """One nft-native rule in ip nat: iptables-nft cannot list the table.  The CLI says so in one line; the daemon
    logs it, keeps running and keeps IPv6 enforced."""
    ns.nft("add table ip nat; add chain ip nat POSTROUTING { type nat hook postrouting priority srcnat; }; "
           "add rule ip nat POSTROUTING ip saddr 10.0.0.0/8 masquerade persistent")
    proc = ns.portguard("check", "--backend", "iptables-nft")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds rules iptables-nft cannot read" in proc.stderr
    d = PortguardDaemon(ns, tmp_path, "--backend", "iptables-nft", env=NO_DOCKER)
    try:
        assert d.wait_event("rule.unfixable", timeout=10), d.log_path.read_text()
        assert d.proc.poll() is None
        time.sleep(1.0)
        assert d.proc.poll() is None and len(d.named("rule.unfixable")) == 1  # once, not once per sync
    finally:
        d.close()


def test_foreign_jump_to_portguard_is_a_kernel_refusal_with_its_real_message(ns: Netns) -> None:
    """`-A OUTPUT -j PORTGUARD` makes the kernel refuse MASQUERADE/SNAT in the chain (EINVAL): one line with the
    failing batch line, exit 2, and no retry loop."""
    ns.run(["iptables-nft", "-t", "nat", "-N", "PORTGUARD"])
    ns.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-j", "PORTGUARD"])
    proc = ns.portguard("apply", "--backend", "iptables-nft")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "Invalid argument" in err and "line " in err and not err.endswith("(nf_tables):"), proc.stderr


def test_legacy_backend_registers_no_table_it_does_not_need(ns: Netns) -> None:
    """In a fresh namespace the legacy backend registers the nat table only (not filter, mangle, raw, security)."""
    apply(ns, "iptables-legacy")
    assert ns.run(["cat", "/proc/net/ip_tables_names"]).stdout.split() == ["nat"]
    assert ns.run(["cat", "/proc/net/ip6_tables_names"]).stdout.split() == []


CONFIGS = [
    "",
    'protocols = ["tcp", "udp"]\nfully_random = true\n',
    'families = ["ipv4"]\nsource_ports = "40000"\nto_ports = "50000-50001"\n',
    '[egress]\ninterfaces = ["eth0", "ens+"]\nexclude_interfaces = ["lo"]\n'
    'exclude_destinations = ["10.0.0.0/8", "fd00::/8"]\n',
]


def _nft_kernel(ns: Netns) -> str:
    text = ns.nft("list", "table", "inet", "portguard") + ns.nft("list", "table", "inet", "portguard_standby")
    return re.sub(r"packets \d+ bytes \d+", "packets 0 bytes 0", text)


def _xt_kernel(ns: Netns, backend: str) -> list[str]:
    lines = []
    for tool in (f"{xt(backend)}-save", f"ip6{xt(backend)[2:]}-save"):
        lines += [ln for ln in ns.rules(tool) if "PORTGUARD" in ln]
    return lines


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_kernel_holds_exactly_what_render_printed(ns: Netns, tmp_path: Path, backend: str, config: int) -> None:
    """For accepted configs and every backend, apply leaves in the kernel exactly the rules render printed."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text(CONFIGS[config])
    if backend == "iptables-legacy":
        ns.run(["ip6tables-legacy", "-t", "nat", "-S", "POSTROUTING"])  # a legacy host using IPv6 NAT
    shown = ns.portguard("render", "--backend", backend, "--config", str(cfg))
    assert shown.returncode == 0, shown.stderr
    apply(ns, backend, "--config", str(cfg))
    if backend == "nftables":
        assert _nft_kernel(ns) == shown.stdout
    else:
        rendered = [ln.replace("-I POSTROUTING 1 ", "-A POSTROUTING ") for ln in shown.stdout.splitlines()
                    if ln.startswith(("-A ", "-I "))]
        assert sorted(_xt_kernel(ns, backend)) == sorted(rendered)
