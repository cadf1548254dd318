"""`portguard doctor` in deliberately broken namespaces: each finding, and a clean bill of health."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import apply, keep_conntrack_on, open_gap
from netns import Netns
from topology import AclNetwork

from portguard.conntrack import Flow
from portguard.doctor import capacity_use, escaping_ports
from portguard.rules import PortRange

pytestmark = pytest.mark.netns
NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
HOLD_SERVER = """
import socket, time
s = socket.socket(); s.bind(("198.51.100.2", 9090)); s.listen(8); print("ready", flush=True)
held = [s.accept() for _ in range(3)]; time.sleep(60)
"""
HOLD_CLIENT = """
import socket, time
held = [socket.create_connection(("198.51.100.2", 9090), timeout=5) for _ in range(3)]
print("open", flush=True); time.sleep(60)
"""


def _doctor(ns: Netns, *args: str) -> tuple[int, dict[str, object]]:
    proc = ns.portguard("doctor", "--json", *args, env=NO_DOCKER)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _risks(report: dict[str, object]) -> dict[str, str]:
    """Risk messages by check (several of one check joined with ' | ')."""
    out: dict[str, str] = {}
    for f in report["findings"]:  # type: ignore[attr-defined]
        if f["severity"] == "risk":
            out[f["check"]] = f"{out[f['check']]} | {f['message']}" if f["check"] in out else f["message"]
    return out


def test_healthy_namespace_has_no_risks_and_docker_absence_is_information(ns: Netns) -> None:
    """Rules applied, defaults elsewhere: exit 0; Docker not running is an info line, not a risk."""
    apply(ns, "nftables")
    code, report = _doctor(ns)
    assert code == 0, report
    assert report["backend"] == "nftables" and "srcnat-10" in str(report["backend_reason"])
    infos = {f["check"]: f["message"] for f in report["findings"]}  # type: ignore[union-attr, index]
    assert "not reachable or not running" in infos["docker"]
    assert "allows 11849 concurrent connections per destination" in infos["capacity"]
    human = ns.portguard("doctor", env=NO_DOCKER)
    assert human.returncode == 0 and human.stdout.strip().endswith("no risks found")


def test_absent_rule_and_an_earlier_nat_chain_are_risks(ns: Netns) -> None:
    """No rule installed, and an nft nat chain that runs before portguard's: both reported, exit 1."""
    code, report = _doctor(ns)
    assert code == 1 and "is absent" in _risks(report)["rules"]
    apply(ns, "nftables")
    ns.nft("add table ip early; add chain ip early post { type nat hook postrouting priority 0; }")
    code, report = _doctor(ns)
    assert code == 1 and "ip early post (priority 0)" in _risks(report)["precedence"]


def test_ephemeral_ports_outside_the_matched_range_are_a_risk(ns: Netns) -> None:
    """ip_local_port_range 1024-65000 with source_ports 32768-61000: two escaping ranges named."""
    apply(ns, "nftables")
    ns.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
    code, report = _doctor(ns)
    assert code == 1
    risk = _risks(report)["port_range"]
    assert "includes 1024-32767, outside source_ports 32768-61000" in risk and "includes 61001-65000" in risk


def test_forced_flavour_other_than_dockers_is_a_risk(ns: Netns) -> None:
    """Docker's chain in legacy nat while iptables-nft is forced: the conflict is a risk."""
    ns.run(["iptables-legacy", "-t", "nat", "-N", "DOCKER"])
    apply(ns, "iptables-nft", expect=1)
    code, report = _doctor(ns, "--backend", "iptables-nft")
    assert code == 1 and "Docker writes iptables-legacy" in _risks(report)["docker"]


def test_capacity_in_use_and_untranslated_flows_are_risks(ns: Netns, tmp_path: Path) -> None:
    """A 4-port target range with 3 flows to one destination is near exhaustion; a flow opened while the rule
    was missing is found by the effect audit (the ACL drops, like a NACL, so that flow stays in conntrack)."""
    acl = AclNetwork(ns, action="DROP")
    try:
        keep_conntrack_on(ns)
        cfg = tmp_path / "pg.toml"
        cfg.write_text('to_ports = "60000-60003"\n')
        apply(ns, "nftables", "--config", str(cfg))
        # three connections held open to one destination (closed ones may give their port back at once)
        server = acl.far.popen([sys.executable, "-c", HOLD_SERVER], stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        client = ns.popen([sys.executable, "-c", HOLD_CLIENT], stdout=subprocess.PIPE)
        assert client.stdout is not None and client.stdout.readline() == b"open\n"
        open_gap(ns, "nftables")
        assert not acl.connect(timeout=2)
        apply(ns, "nftables", "--config", str(cfg))
        code, report = _doctor(ns, "--config", str(cfg))
        risks = _risks(report)
        assert code == 1
        assert "allows 4 concurrent connections per destination; most in use: 3 towards tcp 198.51.100.2:9090" in \
            risks["capacity"]
        assert "1 flows left with an untranslated source port: tcp 198.51.100.1:" in risks["audit"]
    finally:
        acl.close()


def test_pure_helpers() -> None:
    """Escaping ranges and the busiest destination, computed without the kernel."""
    assert escaping_ports(PortRange(32768, 60999), PortRange(32768, 61000)) == []
    assert escaping_ports(PortRange(1024, 65000), PortRange(32768, 61000)) == [PortRange(1024, 32767),
                                                                             PortRange(61001, 65000)]
    flows = [Flow("tcp", "ESTABLISHED", False, "10.0.0.1", "10.0.0.9", 40000 + i, 80, 50000 + i) for i in range(3)]
    flows.append(Flow("tcp", "ESTABLISHED", False, "10.0.0.1", "10.0.0.8", 40100, 80, 50100))
    assert capacity_use(flows, PortRange(49152, 61000)) == (3, "tcp 10.0.0.9:80")
