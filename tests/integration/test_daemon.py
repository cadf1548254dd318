"""`portguard run` without Docker: triggers, signals, reload, healing and sd_notify, in throwaway namespaces."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import pytest
from daemonproc import SCRAPE, PortguardDaemon, metric, scrape
from helpers import BACKENDS, NFT_RULES, XT_V4_LINES, check, delete_rule, keep_conntrack_on, open_gap, owned_lines, xt
from netns import Netns, wait_for
from topology import ACL_LOW, AclNetwork

pytestmark = pytest.mark.netns
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def _start(daemons: list[PortguardDaemon], ns: Netns, tmp_path: Path, *args: str, **kw: object) -> PortguardDaemon:
    env = {**NO_DOCKER, **kw.pop("env", {})}  # type: ignore[dict-item]
    d = PortguardDaemon(ns, tmp_path, *args, env=env, **kw)  # type: ignore[arg-type]
    daemons.append(d)
    assert d.wait_note("READY=1"), d.log_path.read_text()
    return d


def _healthy(ns: Netns, backend: str) -> bool:
    return ns.portguard("check", "--backend", backend).returncode == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_enforces_without_docker_and_repairs_every_fault(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon],
                                                          backend: str) -> None:
    """With no dockerd at all the rule is enforced from the start, Docker's absence is logged once, and a nat flush,
    a deleted rule and `nft flush ruleset` are each repaired without any timer tick (backstop set to an hour).
    With nftables the owned table is never broken in the first place: the deletion is refused by the kernel."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text("[daemon]\nreconcile_interval = 3600\npoll_interval = 0.2\n")
    d = _start(daemons, ns, tmp_path, "--backend", backend, "--config", str(cfg))
    assert _healthy(ns, backend)
    for fault in ("nat-flush", "delete", "nft-flush"):
        if fault == "nat-flush":
            ns.run([xt(backend), "-t", "nat", "-F"])
        elif fault == "delete":
            assert delete_rule(ns, backend, check=False) is (backend != "nftables")
        else:
            ns.nft("flush", "ruleset")
        assert wait_for(lambda: _healthy(ns, backend), timeout=5), (fault, d.log_path.read_text())
    assert d.wait_event("docker.unavailable"), d.stacks()
    assert len(d.named("docker.unavailable")) == 1
    lines = owned_lines(ns, backend)
    assert len(lines) == len(set(lines)) == (NFT_RULES if backend == "nftables" else XT_V4_LINES)
    if backend == "nftables":
        assert [e for e in d.named("rule.installed") if "ipv4/tcp/host" in e["rules"]] != []  # the start
        assert [e for e in d.named("rule.repaired") if "ipv4/tcp/host" in e["rules"]] == []  # nothing since


def test_sigusr1_writes_every_threads_stack_and_changes_nothing(ns: Netns, tmp_path: Path,
                                                                daemons: list[PortguardDaemon]) -> None:
    """SIGUSR1: the stacks of the main thread and of every supervised worker on stderr; the daemon goes on."""
    d = _start(daemons, ns, tmp_path)
    stacks = d.stacks()
    assert stacks.count("Thread 0x") >= 6 and "supervisor.py" in stacks and "in _keep" in stacks, stacks
    assert d.proc.poll() is None and _healthy(ns, "nftables")
    assert [e for e in d.events() if e.get("level") in ("error", "critical")] == []


def test_sigterm_exits_0_quickly_and_leaves_the_rules(ns: Netns, tmp_path: Path,
                                                       daemons: list[PortguardDaemon]) -> None:
    """SIGTERM: exit 0 within 2 s, rules still in place (a restart opens no leak window)."""
    d = _start(daemons, ns, tmp_path)
    code, took = d.stop(signal.SIGTERM)
    assert code == 0 and took < 2.0, (code, took)
    assert _healthy(ns, "nftables")


def test_cleanup_on_exit_removes_the_rules(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """With --cleanup-on-exit, SIGINT exits 0 and nothing portguard owns is left."""
    d = _start(daemons, ns, tmp_path, "--cleanup-on-exit")
    code, _ = d.stop(signal.SIGINT)
    assert code == 0
    assert owned_lines(ns, "nftables") == []


def test_second_daemon_in_the_same_namespace_is_refused(ns: Netns, tmp_path: Path,
                                                         daemons: list[PortguardDaemon]) -> None:
    """A second `portguard run` in the same namespace exits 2 with a clear message; the first keeps running."""
    first = _start(daemons, ns, tmp_path)
    proc = ns.portguard("run", env=NO_DOCKER, timeout=20)
    assert proc.returncode == 2
    assert "another 'portguard run' is already active in this network namespace" in proc.stderr
    assert first.proc.poll() is None


def test_sighup_reloads_and_an_invalid_config_keeps_the_old_one(ns: Netns, tmp_path: Path,
                                                                daemons: list[PortguardDaemon]) -> None:
    """SIGHUP applies a changed config (old variant removed); an invalid one is logged and the old one stays."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text('to_ports = "49152-61000"\n')
    d = _start(daemons, ns, tmp_path, "--config", str(cfg))
    cfg.write_text('to_ports = "50000-60000"\n')
    d.send(signal.SIGHUP)
    assert d.wait_event("config.reloaded")
    assert wait_for(lambda: ns.portguard("check", "--config", str(cfg)).returncode == 0, 5)
    assert "50000-60000" in ns.nft("list", "table", "inet", "portguard")
    assert "49152-61000" not in ns.nft("list", "table", "inet", "portguard")
    cfg.write_text('to_ports = "60000-50000"\n')
    d.send(signal.SIGHUP)
    assert d.wait_event("config.reload_failed")
    assert "to_ports: low port 60000 is above high port 50000" in d.named("config.reload_failed")[0]["error"]
    ns.nft("flush", "ruleset")  # the old config is still enforced after the failed reload
    assert wait_for(lambda: "50000-60000" in ns.nft("list", "ruleset"), 5)
    assert d.proc.poll() is None


def test_sd_notify_ready_status_and_watchdog(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """READY=1 after the first healthy sync, a STATUS= summary, and WATCHDOG=1 at half of WATCHDOG_USEC."""
    d = _start(daemons, ns, tmp_path, watchdog_usec=600_000)
    assert any(n.startswith(f"STATUS=healthy: {NFT_RULES} rules (nftables)") for n in d.notes), d.notes
    d.notes.clear()
    assert d.wait_note("WATCHDOG=1", timeout=2)
    assert wait_for(lambda: d.drain().count("WATCHDOG=1") >= 3, 10), d.notes  # keeps coming, not just once


def test_conntrack_healing_unsticks_connections_caught_in_the_gap(ns: Netns, tmp_path: Path,
                                                                   daemons: list[PortguardDaemon]) -> None:
    """A connection whose SYN left untranslated while the rule was missing completes after the repair (healed),
    instead of hanging in SYN_SENT; with healing off, the same connection stays stuck (the control)."""
    acl = AclNetwork(ns, action="DROP")  # dropped SYNs are retransmitted through the stale conntrack entry
    try:
        keep_conntrack_on(ns)
        results = {}
        for heal in ("true", "false"):
            cfg = tmp_path / f"heal-{heal}.toml"
            cfg.write_text(f"[daemon]\nconntrack_heal = {heal}\n")
            # iptables-nft: the backend where another process can still open a gap (nftables' table is owned)
            d = _start(daemons, ns, tmp_path, "--config", str(cfg), "--backend", "iptables-nft")
            d.send(signal.SIGSTOP)  # freeze portguard, open the gap, start a connection in it
            try:
                open_gap(ns, "iptables-nft")
                client = ns.popen(["python3", "-c", "import socket; socket.create_connection(('198.51.100.2', 8080), "
                                   "timeout=6).recv(64)"])
                # the SYN has left untranslated: its entry is there (a slow start of the client must not let
                # portguard repair first, which would leave nothing to heal)
                assert wait_for(lambda: "SYN_SENT" in ns.run(["conntrack", "-L", "-p", "tcp", "--dport", "8080"],
                                                             check=False).stdout, 5)
            finally:
                d.send(signal.SIGCONT)
            results[heal] = client.wait(20)
            if heal == "true":
                assert d.wait_event("conntrack.healed"), d.log_path.read_text()
                assert d.named("conntrack.healed")[0]["entries"] >= 1
            d.stop()
        assert results == {"true": 0, "false": 1}, results
        assert acl.ports and all(p >= ACL_LOW for p in acl.ports), acl.ports
    finally:
        acl.close()


def test_a_writer_fighting_portguard_is_reported_as_a_storm(ns: Netns, tmp_path: Path,
                                                            daemons: list[PortguardDaemon]) -> None:
    """Another program deleting the rules again and again: each time repaired at once (no slowdown), and a loud
    repair_storm error."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text("[daemon]\nstorm_repairs = 5\nstorm_window = 30\n")
    d = _start(daemons, ns, tmp_path, "--config", str(cfg), "--backend", "iptables-nft")
    for _ in range(8):
        assert wait_for(lambda: _healthy(ns, "iptables-nft"), 1.0)  # never slowed to a second per repair
        ns.run(["iptables-nft", "-t", "nat", "-F", "PORTGUARD"])
    assert d.wait_event("rule.repair_storm"), d.log_path.read_text()
    storm = d.named("rule.repair_storm")[0]
    assert storm["level"] == "error" and storm["repairs"] >= 5 and storm["window_s"] == 30
    assert wait_for(lambda: _healthy(ns, "iptables-nft"), 1.0)


def test_unreachable_docker_is_logged_once_then_rarely(ns: Netns, tmp_path: Path,
                                                       daemons: list[PortguardDaemon]) -> None:
    """A missing Docker socket never stops enforcement and is not logged on every retry."""
    d = _start(daemons, ns, tmp_path)
    time.sleep(3)
    assert len(d.named("docker.unavailable")) == 1
    assert check(ns, "nftables")[0] == 0 and d.proc.poll() is None


def _scrape(ns: Netns, path: str, port: int = 9640) -> tuple[int, str]:
    return scrape(ns, path, port)


def _metric(body: str, name: str) -> float:
    return metric(body, name)


def test_metrics_and_healthz_follow_the_faults(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """/metrics and /healthz from a running daemon: healthy gauges, repairs counted per reason, 503 while an
    earlier nft chain shadows the rule, Docker not connected."""
    d = _start(daemons, ns, tmp_path)
    code, body = _scrape(ns, "/metrics")
    assert code == 200
    assert _metric(body, "portguard_rule_healthy") == NFT_RULES
    assert 'portguard_build_info{backend="nftables",version="' in body
    assert _metric(body, "portguard_docker_connected") == 0
    assert _metric(body, "portguard_last_successful_sync_timestamp_seconds") > time.time() - 60
    assert _metric(body, "portguard_sync_duration_seconds_count") >= 1
    assert _scrape(ns, "/healthz")[0] == 200
    before = _metric(body, "portguard_repairs_total")
    standby = re.compile(r'portguard_repairs_total\{reason="absent",rule="standby"\} (\S+)')
    installed = float(standby.findall(body)[0])  # the start-up install wrote the standby too
    ns.nft("delete", "table", "inet", "portguard_standby")  # the owned table can't be broken; its standby can
    assert wait_for(lambda: _metric(_scrape(ns, "/metrics")[1], "portguard_repairs_total") == before + 1, 5)
    assert float(standby.findall(_scrape(ns, "/metrics")[1])[0]) == installed + 1
    # a native nft nat chain in the ip family that runs before portguard's: shadows IPv4's early chain, unfixable
    # (the late chain runs after everyone by design: never shadowed)
    ns.nft("add table ip early; add chain ip early post { type nat hook postrouting priority 0; }")
    assert wait_for(lambda: _scrape(ns, "/healthz")[0] == 503, 5)
    assert wait_for(lambda: _metric(_scrape(ns, "/metrics")[1], "portguard_rule_healthy") == NFT_RULES * 3 // 4, 5)
    ns.nft("delete table ip early")
    assert wait_for(lambda: _scrape(ns, "/healthz")[0] == 200, 5)
    assert _metric(_scrape(ns, "/metrics")[1], "portguard_rule_healthy") == NFT_RULES
    assert d.proc.poll() is None


def test_metrics_endpoint_can_be_turned_off(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """metrics.listen = "" serves nothing."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text('[metrics]\nlisten = ""\n')
    _start(daemons, ns, tmp_path, "--config", str(cfg))
    proc = ns.run([sys.executable, "-c", SCRAPE, "http://127.0.0.1:9640/metrics"], check=False)
    assert proc.returncode != 0 and "Connection refused" in proc.stderr


def test_effect_audit_reports_a_flow_that_left_untranslated(ns: Netns, tmp_path: Path,
                                                            daemons: list[PortguardDaemon]) -> None:
    """Rule removed, a connection opened, rule restored without healing: the audit finds that flow, logs it
    and exports it as portguard_untranslated_flows (the ACL drops, like a NACL: a rejected SYN's conntrack entry
    would be gone at once)."""
    acl = AclNetwork(ns, action="DROP")
    try:
        cfg = tmp_path / "pg.toml"
        keep_conntrack_on(ns)
        cfg.write_text("[daemon]\nconntrack_heal = false\naudit_interval = 0.5\n")
        d = _start(daemons, ns, tmp_path, "--config", str(cfg), "--backend", "iptables-nft")
        assert _metric(_scrape(ns, "/metrics")[1], "portguard_untranslated_flows") == 0
        d.send(signal.SIGSTOP)
        try:
            open_gap(ns, "iptables-nft")
            assert not acl.connect(timeout=2)  # left with its low port: the ACL rejected it
        finally:
            d.send(signal.SIGCONT)
        assert d.wait_event("audit.untranslated", timeout=10), d.log_path.read_text()
        event = d.named("audit.untranslated")[0]
        assert event["flows"] >= 1 and "198.51.100.2:8080" in event["first"][0]
        assert _metric(_scrape(ns, "/metrics")[1], "portguard_untranslated_flows") >= 1
        assert acl.connect()  # repaired: new connections are translated
    finally:
        acl.close()


def test_a_no_op_sync_logs_nothing_at_info(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """Unrelated ruleset changes trigger syncs that change nothing: not one line at info level or above."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text('[log]\nlevel = "info"\n')
    d = _start(daemons, ns, tmp_path, "--config", str(cfg), env={"PORTGUARD_LOG_LEVEL": "info"})
    # The start-up's last line comes from the Docker worker, whose first attempt may take a while on a busy host.
    assert d.wait_event("docker.unavailable"), d.stacks()
    mark = len(d.events())
    syncs = _metric(_scrape(ns, "/metrics")[1], "portguard_sync_duration_seconds_count")
    for i in range(5):
        # a base chain anywhere might run first: each one is a notification that requests a sync
        ns.nft(f"add table ip unrelated{i}; add chain ip unrelated{i} c {{ type filter hook forward priority 0; }}")
    assert wait_for(lambda: _metric(_scrape(ns, "/metrics")[1], "portguard_sync_duration_seconds_count") > syncs,
                    10)  # syncs did run
    time.sleep(0.5)  # and any sync still coalesced behind them: none of them may log either
    assert d.events()[mark:] == []
    assert _healthy(ns, "nftables")
