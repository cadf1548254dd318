"""Never silently stop protecting: each failure that used to leave `portguard run` up but idle (or dead), done to
a real daemon in a namespace; afterwards a rule deleted by hand is back within a second."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from daemonproc import PortguardDaemon, metric, scrape
from helpers import NFT_RULES, delete_rule, keep_conntrack_on, owned_lines
from netns import Netns, wait_for
from topology import SERVER_IP, AclNetwork

pytestmark = pytest.mark.netns
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
# UDP datagrams to many ports (from two source sockets, for more tuples than ports): one entry each, ~1 s.
MAKE_ENTRIES = """
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n // 65534 + 1)]
for i in range(n):
    socks[i // 65534].sendto(b"x", (host, i % 65534 + 1))
"""
def _start(daemons: list[PortguardDaemon], ns: Netns, tmp_path: Path, *args: str, config: str = "",
           env: dict[str, str] | None = None, ready: bool = True) -> PortguardDaemon:
    cfg = tmp_path / f"pg-{len(daemons)}.toml"
    cfg.write_text(config)
    d = PortguardDaemon(ns, tmp_path, "--config", str(cfg), *args, env={**NO_DOCKER, **(env or {})})
    daemons.append(d)
    if ready:
        assert d.wait_note("READY=1"), d.log_path.read_text()
    return d


def _repaired_within_a_second(ns: Netns, backend: str = "nftables") -> None:
    """Delete a rule portguard keeps (the standby's, for nftables: the owned table refuses), expect it back < 1 s."""
    if backend == "nftables":
        before = owned_lines(ns, backend, table="portguard_standby")
        assert delete_rule(ns, backend, table="portguard_standby")
        assert wait_for(lambda: owned_lines(ns, backend, table="portguard_standby") == before, 1.0)
    else:
        assert delete_rule(ns, backend)
        assert wait_for(lambda: ns.portguard("check", "--backend", backend).returncode == 0, 1.0)


def _metric(ns: Netns, name: str, port: int = 9640) -> float:
    return metric(scrape(ns, "/metrics", port)[1], name)


def _fake_tool(tmp_path: Path, name: str, script: str) -> dict[str, str]:
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text("#!/bin/sh\n" + script + "\n")
    tool.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}


def test_a_hanging_conntrack_never_blocks_a_repair(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """conntrack that hangs (healing and the audit both call it): repairs go on at full speed, nothing dies."""
    env = _fake_tool(tmp_path, "conntrack", "exec sleep 30")  # ends by itself, before the 50 s deadline
    d = _start(daemons, ns, tmp_path, config="[daemon]\naudit_interval = 0.5\n", env=env)
    _repaired_within_a_second(ns)  # this repair requests a heal, which hangs on the effect worker
    time.sleep(0.5)
    _repaired_within_a_second(ns)
    _repaired_within_a_second(ns)
    assert d.proc.poll() is None and d.named("worker.crashed") == []


def test_sighup_with_an_unreadable_config_keeps_the_old_one(ns: Netns, tmp_path: Path,
                                                            daemons: list[PortguardDaemon]) -> None:
    """SIGHUP after the file became non-UTF-8, then a 5,000-digit number: both logged, the old config stays,
    systemd hears RELOADING=1 with MONOTONIC_USEC and READY=1 each time."""
    d = _start(daemons, ns, tmp_path)
    cfg = Path(d.proc.args[d.proc.args.index("--config") + 1])  # type: ignore[union-attr, index]
    for bad in (b'to_ports = "\xff\xfe"\n', b"source_ports = " + b"1" * 5000 + b"\n"):
        d.notes.clear()
        cfg.write_bytes(bad)
        d.send(signal.SIGHUP)
        assert d.wait_event("config.reload_failed", count=1 if bad.startswith(b"to") else 2), d.log_path.read_text()
        assert d.wait_note("READY=1")
        assert "RELOADING=1" in d.notes and any(n.startswith("MONOTONIC_USEC=") for n in d.notes), d.notes
    assert d.proc.poll() is None
    _repaired_within_a_second(ns)


def test_a_foreign_earlier_nat_chain_is_reported_not_fought(ns: Netns, tmp_path: Path,
                                                            daemons: list[PortguardDaemon]) -> None:
    """A priority-0 nat chain portguard must not touch: reported once, no rewrite, no backoff; repairs go on."""
    d = _start(daemons, ns, tmp_path, config="[daemon]\nreconcile_interval = 3600\n")
    writes = len(d.named("rule.repaired"))
    ns.nft("add table ip early; add chain ip early post { type nat hook postrouting priority 0; }")
    assert d.wait_event("rule.unfixable"), d.log_path.read_text()
    for i in range(5):
        ns.nft(f"add table ip unrelated{i}")  # more syncs: none of them may rewrite
    time.sleep(0.5)
    assert len(d.named("rule.repaired")) == writes and d.named("sync.overwritten") == []
    assert len(d.named("rule.unfixable")) == 1 and d.named("sync.failed") == []
    _repaired_within_a_second(ns)


def test_a_large_conntrack_table_is_streamed(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """100,000 conntrack entries while the audit runs every half second: repairs are still immediate (the
    audit streams; memory is measured in bench/conntrack_scale.py)."""
    acl = AclNetwork(ns)
    try:
        keep_conntrack_on(ns)
        acl.far.run(["iptables-nft", "-A", "INPUT", "-p", "udp", "-j", "DROP"])
        ns.run([sys.executable, "-c", MAKE_ENTRIES, SERVER_IP, "100000"])
        count = int(ns.run(["conntrack", "-C"]).stdout.strip())
        assert count >= 100000, count
        d = _start(daemons, ns, tmp_path, config='protocols = ["tcp", "udp"]\n[daemon]\naudit_interval = 0.5\n')
        time.sleep(1.5)
        _repaired_within_a_second(ns)
        assert d.proc.poll() is None
    finally:
        acl.close()


def test_unprivileged_squatters_cannot_keep_portguard_from_enforcing(ns: Netns, tmp_path: Path,
                                                                     daemons: list[PortguardDaemon]) -> None:
    """A nobody process holding the old abstract socket name and the metrics port: portguard starts, enforces,
    logs the bind failure and serves metrics once the port is free."""
    squat = ("import socket, time\n"
             "a = socket.socket(socket.AF_UNIX); a.bind('\\0portguard.run')\n"
             "t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             "t.bind(('127.0.0.1', 9640)); t.listen(1); print('held', flush=True); time.sleep(60)")
    import subprocess
    squatter = ns.popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", squat],
                        stdout=subprocess.PIPE)
    assert squatter.stdout is not None and squatter.stdout.readline() == b"held\n"
    d = _start(daemons, ns, tmp_path)
    assert d.wait_event("metrics.bind_failed"), d.log_path.read_text()
    _repaired_within_a_second(ns)
    squatter.terminate()
    squatter.wait(10)
    assert d.wait_event("metrics.listening", timeout=20), d.log_path.read_text()
    assert _metric(ns, "portguard_rule_healthy") == NFT_RULES


def test_idle_metrics_connections_keep_the_thread_count_bounded(ns: Netns, tmp_path: Path,
                                                                daemons: list[PortguardDaemon]) -> None:
    """300 idle connections to the metrics port: a bounded number of threads, repairs still immediate."""
    import subprocess
    d = _start(daemons, ns, tmp_path)
    idle = ("import socket, time\nheld = []\nfor _ in range(300):\n    s = socket.socket()\n"
            "    try:\n        s.connect(('127.0.0.1', 9640)); held.append(s)\n    except OSError: pass\n"
            "print(len(held), flush=True); time.sleep(30)")
    holder = ns.popen([sys.executable, "-c", idle], stdout=subprocess.PIPE)
    assert holder.stdout is not None and int(holder.stdout.readline()) > 0
    time.sleep(1.0)
    threads = len(os.listdir(f"/proc/{d.proc.pid}/task"))
    assert threads <= 20, threads
    _repaired_within_a_second(ns)
    holder.terminate()
    holder.wait(10)


def test_a_truncated_netlink_message_is_skipped_and_the_watcher_lives(ns: Netns, tmp_path: Path,
                                                                      daemons: list[PortguardDaemon]) -> None:
    """A truncated message sent to portguard's nf_tables socket is counted as malformed; notifications still work
    (the repair below happens long before the hour-long backstop)."""
    d = _start(daemons, ns, tmp_path, config="[daemon]\nreconcile_interval = 3600\n")
    rows = [ln.split() for ln in ns.run(["cat", "/proc/net/netlink"]).stdout.splitlines()[1:]]
    ports = [int(r[2]) for r in rows if r[1] == "12" and int(r[3], 16) & (1 << 6)]  # NETLINK_NETFILTER, group 7
    assert ports, rows
    send = ("import socket, sys\ns = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12); s.bind((0, 0))\n"
            "for p in sys.argv[1:]: s.sendto(b'\\x30\\x00\\x00\\x00\\x0a\\x0a', (int(p), 0))")
    ns.run([sys.executable, "-c", send, *map(str, ports)])
    assert wait_for(lambda: _metric(ns, "portguard_netlink_malformed_total") >= 1, 5)
    _repaired_within_a_second(ns)
    assert d.named("worker.crashed") == []


def test_cleanup_on_exit_waits_for_the_sync_in_flight(ns: Netns, tmp_path: Path,
                                                      daemons: list[PortguardDaemon]) -> None:
    """SIGTERM with --cleanup-on-exit while a slow iptables-nft-restore is writing: the write finishes first, then
    the cleanup; nothing of portguard's is left behind."""
    env = _fake_tool(tmp_path, "iptables-nft-restore", 'sleep 1.5; exec /usr/sbin/iptables-nft-restore "$@"')
    d = _start(daemons, ns, tmp_path, "--backend", "iptables-nft", "--cleanup-on-exit", env=env)
    ns.run(["iptables-nft", "-t", "nat", "-F", "PORTGUARD"])  # a repair starts: 1.5 s in the restore
    time.sleep(0.3)
    code, _ = d.stop(signal.SIGTERM, timeout=30)
    assert code == 0
    left = [ln for ln in ns.run(["iptables-nft-save", "-t", "nat"]).stdout.splitlines() if "PORTGUARD" in ln]
    assert left == [], left


def test_reload_switches_to_a_new_docker_host(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """docker.host changed on SIGHUP: the Docker watcher is restarted against the new address."""
    d = _start(daemons, ns, tmp_path, config='[docker]\nhost = "unix:///nonexistent/one.sock"\n')
    assert d.wait_event("docker.unavailable"), d.log_path.read_text()
    cfg = Path(d.proc.args[d.proc.args.index("--config") + 1])  # type: ignore[union-attr, index]
    cfg.write_text('[docker]\nhost = "unix:///nonexistent/two.sock"\n')
    d.send(signal.SIGHUP)
    assert d.wait_event("config.reloaded"), d.log_path.read_text()
    assert d.wait_event("docker.unavailable", count=2), d.log_path.read_text()
    assert d.proc.poll() is None and d.named("worker.crashed") == []


def test_ready_even_when_started_next_to_something_unfixable(ns: Netns, tmp_path: Path,
                                                             daemons: list[PortguardDaemon]) -> None:
    """Started with a foreign priority-0 nat chain in place: READY=1 still comes (systemd would otherwise restart
    it forever), STATUS says what is unfixable, /healthz says 503."""
    ns.nft("add table ip early; add chain ip early post { type nat hook postrouting priority 0; }")
    d = _start(daemons, ns, tmp_path)
    assert any(n.startswith("STATUS=unfixable") for n in d.notes), d.notes
    assert scrape(ns, "/healthz")[0] == 503
    _repaired_within_a_second(ns)
