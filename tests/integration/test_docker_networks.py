"""Docker networks on the wire, with a real dockerd and `portguard run`: each network's traffic leaves with the
address Docker would give it and a port in the ACL's range; networks coming and going never open a gap."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from daemonproc import PortguardDaemon
from dockerhost import IMAGE, DockerEngine, docker_lab, run_once
from netns import Netns, wait_for
from topology import ACL_LOW, NEAR_IP, OPEN_PORT, SECONDARY_IP, SERVER_IP, AclNetwork

pytestmark = [pytest.mark.netns, pytest.mark.docker]
LOW_PORTS = "net.ipv4.ip_local_port_range=32768 40000"
NOMASQ_SUBNET, NOMASQ_IP = "10.77.0.0/24", "10.77.0.10"


@dataclass
class Host:
    ns: Netns
    acl: AclNetwork
    engine: DockerEngine
    backend: str
    daemon: PortguardDaemon

    def seen_from(self, network: str, *extra: str) -> tuple[str, int]:
        """(address, port) the far side saw for one container fetch on ``network`` (the port without an ACL)."""
        before = len(self.acl.open_peers)
        out = run_once(self.engine.docker, "--sysctl", LOW_PORTS, "--network", network, *extra, IMAGE,
                       "wget", "-q", "-O", "-", f"http://{SERVER_IP}:{OPEN_PORT}/")
        assert out.returncode == 0 and out.stdout == "ok\n", (out.returncode, out.stdout, out.stderr,
                                                              self.daemon.log_path.read_text()[-3000:])
        assert wait_for(lambda: len(self.acl.open_peers) > before, 5)
        return self.acl.open_peers[-1]

    def healthy(self) -> bool:
        env = {"DOCKER_HOST": self.engine.host}
        return self.ns.portguard("check", "--backend", self.backend, env=env).returncode == 0

    def log(self) -> str:
        return "\n".join(str(e) for e in self.daemon.events() if e.get("level") != "debug")[-3000:]


@pytest.fixture(scope="module", params=["nftables", "iptables-nft"])
def host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    work = tmp_path_factory.mktemp("dnets")
    with docker_lab("pgdn", work) as lab:
        lab.acl.far.run(["ip", "route", "add", NOMASQ_SUBNET, "via", NEAR_IP])  # replies to un-NATed containers
        daemon = PortguardDaemon(lab.ns, work, "--backend", request.param, env={"DOCKER_HOST": lab.engine.host})
        lab.stack.callback(daemon.close)
        assert daemon.wait_note("READY=1"), daemon.log_path.read_text()
        yield Host(lab.ns, lab.acl, lab.engine, request.param, daemon)


def test_default_network_is_masqueraded_with_a_high_port(host: Host) -> None:
    """The default bridge: the egress address, as Docker's MASQUERADE gives it, and a port in the ACL's range."""
    addr, port = host.seen_from("bridge")
    assert addr == NEAR_IP and port >= ACL_LOW, (addr, port)


def test_host_ipv4_network_keeps_its_snat_address(host: Host) -> None:
    """A network created with com.docker.network.host_ipv4: that address (not the primary one) and a high port."""
    host.engine.docker("network", "create", "--subnet", "10.76.0.0/24", "-o",
                       f"com.docker.network.host_ipv4={SECONDARY_IP}", "pghostip")
    try:
        assert wait_for(host.healthy, 5), host.log()
        addr, port = host.seen_from("pghostip")
        assert addr == SECONDARY_IP and port >= ACL_LOW, (addr, port)
    finally:
        host.engine.docker("network", "rm", "pghostip")


def test_unmasqueraded_network_keeps_the_container_address(host: Host) -> None:
    """enable_ip_masquerade=false: the container's own address, and still a port in the ACL's range."""
    host.engine.docker("network", "create", "--subnet", NOMASQ_SUBNET, "-o",
                       "com.docker.network.bridge.enable_ip_masquerade=false", "pgnomasq")
    try:
        assert wait_for(host.healthy, 5), host.log()
        addr, port = host.seen_from("pgnomasq", "--ip", NOMASQ_IP)
        assert addr == NOMASQ_IP and port >= ACL_LOW, (addr, port)
    finally:
        host.engine.docker("network", "rm", "pgnomasq")


def test_networks_coming_and_going_change_the_rules_in_one_sync_and_never_open_a_gap(host: Host) -> None:
    """A container fetches every 50 ms while networks of every kind are created and removed: every fetch leaves
    with a high port; the special networks' rules appear with the network and go with it."""
    host.engine.docker("network", "create", "--subnet", "10.75.0.0/24", "pgprobe")
    probe = host.engine.docker(
        "run", "-d", "--sysctl", LOW_PORTS, "--network", "pgprobe", IMAGE, "sh", "-c",
        f"while true; do wget -q -O - http://{SERVER_IP}:{OPEN_PORT}/ >/dev/null; sleep 0.05; done").stdout.strip()
    try:
        start = len(host.acl.open_peers)
        docker = {"DOCKER_HOST": host.engine.host}
        for i in range(3):
            host.engine.docker("network", "create", "--subnet", f"10.74.{i}.0/24", "-o",
                               f"com.docker.network.host_ipv4={SECONDARY_IP}", f"pgchurn{i}")
            assert wait_for(lambda i=i: f"net:pgchurn{i}" in host.ns.portguard(
                "check", "--json", "--backend", host.backend, env=docker).stdout, 5), host.log()
            host.engine.docker("network", "create", "--subnet", f"10.73.{i}.0/24", f"pgplain{i}")
        for i in range(3):
            host.engine.docker("network", "rm", f"pgchurn{i}", f"pgplain{i}")
        assert wait_for(host.healthy, 5), host.log()
        assert "net:pgchurn" not in host.ns.portguard("check", "--json", "--backend", host.backend,
                                                      env={"DOCKER_HOST": host.engine.host}).stdout
        time.sleep(0.5)
        seen = host.acl.open_peers[start:]
        assert len(seen) >= 10, seen
        assert all(port >= ACL_LOW and addr == NEAR_IP for addr, port in seen), seen
        events = [e for e in host.daemon.named("inventory.changed") if e["runtime"] == "docker"]
        assert events, host.daemon.log_path.read_text()[-2000:]
    finally:
        host.engine.docker("rm", "-f", probe, check=False)
        host.engine.docker("network", "rm", "pgprobe", check=False)


def test_a_container_started_and_removed_on_an_existing_network_costs_no_sync_and_no_write(host: Host) -> None:
    """Container life changes no network: no Docker event reaches portguard, no inventory change, no rule write
    (portguard's tables read the same, counters aside), and the container still gets through."""
    def tables() -> str:
        if host.backend == "nftables":
            return re.sub(r"packets \d+ bytes \d+", "", host.ns.nft("list", "table", "inet", "portguard"))
        return "\n".join(ln for ln in host.ns.rules("iptables-nft-save") if "PORTGUARD" in ln)

    host.engine.docker("network", "create", "--subnet", "10.71.0.0/24", "pgexisting")
    try:
        assert wait_for(lambda: "net:pgexisting" in host.ns.portguard(
            "check", "--json", "--backend", host.backend, env={"DOCKER_HOST": host.engine.host}).stdout, 5), host.log()
        time.sleep(0.5)  # the network's own events and syncs are over
        before, seen = tables(), len(host.daemon.events())
        addr, port = host.seen_from("pgexisting")
        time.sleep(1.0)
        new = [e["event"] for e in host.daemon.events()[seen:]]
        assert not [e for e in new if e.startswith(("docker.event", "rule.", "inventory."))], new
        assert tables() == before
        assert addr == NEAR_IP and port >= ACL_LOW, (addr, port)
    finally:
        host.engine.docker("network", "rm", "pgexisting")
