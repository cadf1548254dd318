"""Podman on this machine (Debian 12: podman 4.3.1, netavark 1.4.0 with its iptables driver), rootful, in a test
network namespace and a private mount namespace that holds its configuration and storage; portguard runs in both
and finds Podman's networks (its in-memory default network, the files of the ones created) itself.

Containers and `podman build` RUN steps leave translated; the host talking to a container through podman0 keeps
its port (Podman's bridges are excluded like Docker's).  Images come without a registry: a static client/server
(tests/pgnet.c) imported with `podman import`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemonproc import PortguardDaemon
from images import PGNET_IMAGE, PODMAN_CONF, pgnet_tar
from netns import Netns, wait_for
from topology import ACL_LOW, NEAR_IP, SERVER_IP, AclNetwork

pytestmark = [pytest.mark.netns, pytest.mark.podman]
LOW = "net.ipv4.ip_local_port_range=32768 40000"
CONTAINERS_CONF = PODMAN_CONF + """events_logfile_path = "{work}/events.log"
tmp_dir = "{work}/libpod"
[network]
network_backend = "netavark"
"""
STORAGE_CONF = '[storage]\ndriver = "overlay"\ngraphroot = "{work}/storage"\nrunroot = "{work}/runroot"\n'
# The mount namespace: this machine's runtime files hidden, Podman's configuration the test's own.
HOLD = """
set -e
for d in /etc/cni/net.d /run/flannel /var/lib/rancher; do [ -d "$d" ] && mount -t tmpfs tmpfs "$d"; done
mount --bind "$W/containers" /etc/containers
echo ready
exec sleep infinity
"""
CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.getsockname()[1], flush=True); s.recv(64)
"""


@dataclass
class PodmanHost:
    ns: Netns
    acl: AclNetwork
    holder: subprocess.Popen[str]
    work: Path
    daemon: PortguardDaemon | None = None

    def argv(self, cmd: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", f"--net={self.ns.path}", *cmd]

    def podman(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(self.work / "storage.conf")}
        proc = subprocess.run(self.argv(["podman", *args]), capture_output=True, text=True, timeout=timeout,
                              check=False, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
        return proc

    def portguard(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PORTGUARD_")}
        return subprocess.run(self.argv([sys.executable, "-m", "portguard", *args]), capture_output=True, text=True,
                              timeout=60, check=False, env={**env, "PORTGUARD_CONFIG": "/dev/null"})

    def log(self) -> str:
        return self.daemon.log_path.read_text()[-3000:] if self.daemon else ""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanHost]:
    work = tmp_path_factory.mktemp("podman")
    conf = work / "containers"
    shutil.copytree("/etc/containers", conf, symlinks=True)
    (conf / "containers.conf").write_text(CONTAINERS_CONF.format(work=work))
    (work / "storage.conf").write_text(STORAGE_CONF.format(work=work))
    shutil.copy2(work / "storage.conf", conf / "storage.conf")
    ns = Netns("pgpm")
    acl = AclNetwork(ns)
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", HOLD],
                              env={**os.environ, "W": str(work)}, stdout=subprocess.PIPE, text=True)
    ph = PodmanHost(ns, acl, holder, work)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        ph.podman("import", str(pgnet_tar(work)), PGNET_IMAGE)
        ph.daemon = PortguardDaemon(ns, work, launch=lambda extra: ph.argv(
            ["env", *[f"{k}={v}" for k, v in {**extra, "PORTGUARD_CONFIG": "/dev/null"}.items()],
             sys.executable, "-m", "portguard", "run"]))
        assert ph.daemon.wait_note("READY=1", 20), ph.log()
        yield ph
    finally:
        ph.podman("rm", "-af", "-t", "0", check=False)
        ph.podman("network", "prune", "-f", check=False)
        if ph.daemon is not None:
            ph.daemon.close()
        holder.kill()
        holder.wait(10)
        acl.close()
        ns.close()


def _fetch(host: PodmanHost, *args: str, count: int = 3) -> list[tuple[str, int]]:
    before = len(host.acl.peers)
    host.podman("run", "--rm", "--sysctl", LOW, *args, PGNET_IMAGE, "/pgnet", "connect", SERVER_IP, "8080",
                str(count))
    assert wait_for(lambda: len(host.acl.peers) >= before + count, 5)
    return host.acl.peers[before:]


def test_a_container_on_podmans_default_network_leaves_translated(host: PodmanHost) -> None:
    """podman0 (the in-memory default network): masqueraded as netavark would, with high ports."""
    seen = _fetch(host)
    assert all(addr == NEAR_IP and port >= ACL_LOW for addr, port in seen), seen


def test_a_created_network_is_found_in_its_file_and_leaves_translated(host: PodmanHost) -> None:
    """`podman network create` writes /etc/containers/networks/NAME.json: portguard picks it up by itself."""
    host.podman("network", "create", "--disable-dns", "--subnet", "10.89.7.0/24", "pgnet")
    assert wait_for(lambda: "podman:pgnet" in host.portguard("check", "--json").stdout, 5), host.log()
    seen = _fetch(host, "--network", "pgnet")
    assert all(addr == NEAR_IP and port >= ACL_LOW for addr, port in seen), seen


def test_a_podman_build_run_step_leaves_translated(host: PodmanHost) -> None:
    """A RUN step that connects ten times: each leaves with a high port (its ports cannot be forced low, so ten
    make an untranslated step fail all but surely)."""
    ctx = host.work / "build"
    ctx.mkdir(exist_ok=True)
    (ctx / "Containerfile").write_text(f'FROM {PGNET_IMAGE}\nRUN ["/pgnet", "connect", "{SERVER_IP}", "8080", "10"]\n')
    before = len(host.acl.peers)
    host.podman("build", "--no-cache", "-t", "localhost/pg-built", str(ctx), timeout=300)
    seen = host.acl.peers[before:]
    assert len(seen) >= 10 and all(port >= ACL_LOW for _, port in seen), seen


def test_the_host_talking_to_a_container_keeps_its_port(host: PodmanHost) -> None:
    """Host -> container through podman0: excluded, so the container sees the host's own (low) source port."""
    host.podman("run", "-d", "--name", "pgserver", PGNET_IMAGE, "/pgnet", "serve", "8090")
    ip = host.podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "pgserver").stdout.strip()
    assert wait_for(lambda: host.ns.run([sys.executable, "-c", CLIENT, ip, "8090"], check=False).returncode == 0, 10)
    out = host.ns.run([sys.executable, "-c", CLIENT, ip, "8090"])
    port = int(out.stdout.split()[0])
    assert wait_for(lambda: f" {port}" in host.podman("logs", "pgserver").stdout, 5)
    seen = [line.split() for line in host.podman("logs", "pgserver").stdout.splitlines()]
    assert [addr for addr, p in seen if int(p) == port] == ["10.88.0.1"] and port < ACL_LOW, (seen, port)
