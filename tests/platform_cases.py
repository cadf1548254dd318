"""The platform matrix's cases (test_platform_<suite>.py run them, one file per userland, so that each userland
is one unit of work for pytest-xdist): Debian 12, 13 and unstable, each its own userland with its own Docker,
Python, nft and iptables (tests/userland.py), the project installed by its own ``scripts/install.sh`` from a
copy of this checkout, and real traffic through a stateless REJECT ACL with low source ports forced.

In each userland, in file order: the install; portguard from that install running next to that userland's
dockerd; a default-network container, a ``host_ipv4`` network, a ``gateway_mode_ipv4=routed`` network (Docker
>= 27), a RUN step of ``docker build`` (BuildKit where the suite packages docker-buildx), host traffic from a
secondary address; again after ``nft flush ruleset``, a dockerd restart and portguard killed and started again;
then ``check``, ``doctor`` and ``render``.  Each userland's versions and outcome become a row of the README's
"Tested platforms" table (conftest.py).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemonproc import PortguardDaemon
from dockerhost import IMAGE, busybox_tar, run_once
from images import PGNET_IMAGE, PODMAN_CONF, pgnet_tar
from netns import Netns, wait_for
from topology import ACL_LOW, NEAR_IP, SECONDARY_IP, SERVER_IP, AclNetwork
from userland import SUITES, Suite, Userland, record_platform

MARKS = [pytest.mark.netns, pytest.mark.docker, pytest.mark.platform]
LOW_PORTS = "net.ipv4.ip_local_port_range=32768 40000"
ROUTED_NET, ROUTED_IP = "10.72.0.0/24", "10.72.0.10"
HOSTIP_NET = "10.76.0.0/24"
# A build whose RUN step fetches ten times: a BuildKit step's source ports lie anywhere in 32768-60999 and cannot
# be forced low (its /proc/sys is read-only), so ten fetches make an untranslated step fail all but surely.
DOCKERFILE = (f"FROM {IMAGE}\n"
              f"RUN for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O - http://{SERVER_IP}:8080/ || exit 1; done\n")
BUILD_INSTALLS = ("gcc", "libc6-dev", "python3-dev")


@dataclass
class Stack:
    ul: Userland
    ns: Netns
    acl: AclNetwork
    workdir: Path
    install: subprocess.CompletedProcess[str]
    added: set[str]
    daemon: PortguardDaemon | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def suite(self) -> str:
        return self.ul.suite.name

    def docker(self, *args: str, check: bool = True, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        return self.ul.docker(self.ns, *args, check=check, env=env)

    def start_portguard(self) -> None:
        """The userland's own installed portguard, with its installed config (/etc/portguard/portguard.toml)."""
        self.daemon = PortguardDaemon(
            self.ns, self.ul.run_dir,  # the userland's /run: its notify socket is reachable from inside
            launch=lambda env: self.ul.argv(["/opt/portguard/bin/portguard", "run"], ns=self.ns, env=env),
            notify_as=self._inside)
        assert self.daemon.wait_note("READY=1", 30), self.daemon.log_path.read_text()[-3000:]

    def _inside(self, host_path: str) -> str:
        # The daemon's notify socket is made in the userland's /run, which is a directory of this machine.
        return "/run/" + Path(host_path).relative_to(self.ul.run_dir).as_posix()

    def portguard(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ul.run(["portguard", *args], ns=self.ns, check=False)

    def fetch(self, *docker_args: str) -> tuple[str, int]:
        """(address, port) the far side saw behind the ACL for one container fetch (low source ports forced)."""
        before = len(self.acl.peers)
        out = run_once(self.docker, "--sysctl", LOW_PORTS, *docker_args, IMAGE,
                       "wget", "-q", "-O", "-", f"http://{SERVER_IP}:8080/")
        assert out.returncode == 0 and out.stdout == "ok\n", (out.returncode, out.stdout, out.stderr, self.log())
        assert wait_for(lambda: len(self.acl.peers) > before, 5)
        return self.acl.peers[-1]

    def log(self) -> str:
        if self.daemon is None:
            return ""
        return "\n".join(str(e) for e in self.daemon.events() if e.get("level") != "debug")[-3000:]


def stack_fixture(name: str) -> Any:
    """The module-wide stack of one userland: test_platform_<name>.py binds it as its ``stack`` fixture."""

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
        yield from _stack(SUITES[name], tmp_path_factory)

    return stack


def _stack(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(f"platform-{suite.name}")
    ul = Userland(suite)
    ns = Netns("pgpl")
    acl: AclNetwork | None = None
    stack: Stack | None = None
    try:
        before = ul.installed()
        install = ul.install_portguard()
        added = ul.installed() - before
        acl = AclNetwork(ns)
        acl.far.run(["ip", "route", "add", ROUTED_NET, "via", NEAR_IP])  # replies to the routed network
        ul.start_dockerd(ns, workdir / "dockerd.log")
        ul.put({"/root/busybox.tar": busybox_tar(workdir).read_bytes()})
        ul.docker(ns, "import", "/root/busybox.tar", IMAGE)
        stack = Stack(ul, ns, acl, workdir, install, added)
        stack.versions = {
            "docker": ul.docker(ns, "version", "--format", "{{.Server.Version}}").stdout.strip(),
            "python": ul.run(["python3", "-c", "import platform; print(platform.python_version())"]).stdout.strip(),
            "nft": ul.run(["nft", "--version"]).stdout.split()[1],
            "iptables": ul.run(["iptables", "--version"]).stdout.split()[1],
        }
        stack.start_portguard()
        yield stack
    finally:
        if stack is not None and stack.daemon is not None:
            stack.daemon.close()
        ul.stop_dockerd(ns)
        if acl is not None:
            acl.close()
        ns.close()
        ul.close()
        if stack is not None:
            record_platform(suite.name, stack.versions)


def test_install_leaves_portguard_its_unit_completion_and_man_page_and_no_build_packages(stack: Stack) -> None:
    """scripts/install.sh from the checkout's root on a minimal userland: exit 0, portguard on the PATH, the unit,
    shell completion and the man page installed, and the compiler it needed for python-iptables removed again."""
    assert stack.install.returncode == 0
    assert not (set(BUILD_INSTALLS) & stack.added), sorted(stack.added)
    assert stack.ul.run(["portguard", "--version"]).stdout.startswith("portguard ")
    files = ["/usr/local/share/man/man1/portguard.1", "/usr/share/bash-completion/completions/portguard",
             "/usr/share/zsh/vendor-completions/_portguard", "/usr/share/fish/vendor_completions.d/portguard.fish",
             "/etc/systemd/system/portguard.service", "/etc/portguard/portguard.toml"]
    stack.ul.run(["test", "-s", files[0], *[a for f in files[1:] for a in ("-a", "-s", f)]])
    unit = stack.ul.run(["cat", "/etc/systemd/system/portguard.service"]).stdout
    assert "ExecStart=/opt/portguard/bin/portguard run" in unit
    assert "ExecReload=/opt/portguard/bin/portguard reload" in unit


def test_default_network_container_leaves_with_the_egress_address_and_a_high_port(stack: Stack) -> None:
    """A container on Docker's default bridge: the egress address, as Docker's MASQUERADE gives it, a high port."""
    addr, port = stack.fetch()
    assert addr == NEAR_IP and port >= ACL_LOW, (addr, port)


def test_host_ipv4_network_leaves_with_its_snat_address(stack: Stack) -> None:
    """A network created with host_ipv4: that address, as Docker's SNAT gives it, and a high port."""
    stack.docker("network", "create", "--subnet", HOSTIP_NET, "-o", f"com.docker.network.host_ipv4={SECONDARY_IP}",
                 "pghostip")
    assert wait_for(lambda: "net:pghostip" in stack.portguard("check", "--json").stdout, 10), stack.log()
    addr, port = stack.fetch("--network", "pghostip")
    assert addr == SECONDARY_IP and port >= ACL_LOW, (addr, port)


def test_a_build_run_step_leaves_translated(stack: Stack) -> None:
    """`docker build` with a RUN step that fetches ten times through the ACL: BuildKit (docker-buildx) where the
    suite packages it, the classic builder otherwise; every fetch passes with a high port."""
    stack.ul.put({"/root/build/Dockerfile": DOCKERFILE.encode()})
    env = {} if stack.ul.suite.buildx else {"DOCKER_BUILDKIT": "0"}
    before = len(stack.acl.peers)
    out = stack.docker("build", "--no-cache", "-t", "pgbuild", "/root/build", check=False, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    classic = "Step 1/2 : FROM" in out.stdout
    assert classic is not stack.ul.suite.buildx, out.stdout[-1000:] + out.stderr[-1000:]
    seen = stack.acl.ports[before:]
    assert len(seen) >= 10 and min(seen) >= ACL_LOW, seen


def test_host_traffic_from_a_secondary_address_keeps_it(stack: Stack) -> None:
    """The host itself, bound to a secondary address: that address, and a high port."""
    assert stack.acl.connect(source=SECONDARY_IP)
    addr, port = stack.acl.peers[-1]
    assert addr == SECONDARY_IP and port >= ACL_LOW, (addr, port)


def test_routed_network_keeps_the_container_address(stack: Stack) -> None:
    """Docker >= 27's gateway_mode_ipv4=routed: Docker does not NAT it, so the container's own address (the far
    side routes back to it), and a high port."""
    assert int(stack.versions["docker"].split(".")[0]) >= 27, stack.versions
    stack.docker("network", "create", "--subnet", ROUTED_NET, "-o",
                 "com.docker.network.bridge.gateway_mode_ipv4=routed", "pgrouted")
    addr, port = stack.fetch("--network", "pgrouted", "--ip", ROUTED_IP)
    assert addr == ROUTED_IP and port >= ACL_LOW, (addr, port)


HOST_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.getsockname()[1], flush=True); s.recv(64)
"""


def test_podman_runs_builds_and_host_to_container(stack: Stack) -> None:
    """The userland's own Podman (5.x, netavark's nftables driver) next to its dockerd: a container on the default
    network and one on a created network leave with the egress address and high ports, a `podman build` RUN step
    too; the host talking to a container through podman0 keeps its port.  portguard finds the networks itself."""
    stack.ul.put({"/etc/containers/containers.conf": PODMAN_CONF.encode(),
                  "/root/pgnet.tar": pgnet_tar(stack.workdir).read_bytes(),
                  "/root/podbuild/Containerfile": f'FROM {PGNET_IMAGE}\nRUN ["/pgnet", "connect", "{SERVER_IP}", '
                                                  f'"8080", "10"]\n'.encode()})

    def podman(*args: str) -> subprocess.CompletedProcess[str]:
        return stack.ul.run(["podman", *args], ns=stack.ns, timeout=300)

    podman("import", "/root/pgnet.tar", PGNET_IMAGE)
    podman("network", "create", "--disable-dns", "--subnet", "10.89.7.0/24", "pgpodnet")
    assert wait_for(lambda: "podman:pgpodnet" in stack.portguard("check", "--json").stdout, 10), stack.log()
    for network in ("podman", "pgpodnet"):
        before = len(stack.acl.peers)
        podman("run", "--rm", "--network", network, "--sysctl", LOW_PORTS, PGNET_IMAGE, "/pgnet", "connect",
               SERVER_IP, "8080", "3")
        seen = stack.acl.peers[before:]
        assert len(seen) == 3 and all(a == NEAR_IP and p >= ACL_LOW for a, p in seen), (network, seen, stack.log())
    before = len(stack.acl.peers)
    podman("build", "--no-cache", "-t", "localhost/pg-built", "/root/podbuild")
    assert len(stack.acl.ports[before:]) >= 10 and min(stack.acl.ports[before:]) >= ACL_LOW, stack.acl.ports
    podman("run", "-d", "--name", "pgserver", PGNET_IMAGE, "/pgnet", "serve", "8090")
    try:
        ip = podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "pgserver").stdout.strip()
        assert wait_for(lambda: stack.ns.run([sys.executable, "-c", HOST_CLIENT, ip, "8090"],
                                             check=False).returncode == 0, 10)
        port = int(stack.ns.run([sys.executable, "-c", HOST_CLIENT, ip, "8090"]).stdout.split()[0])
        assert wait_for(lambda: f" {port}" in podman("logs", "pgserver").stdout, 5)
        seen = [line.split() for line in podman("logs", "pgserver").stdout.splitlines()]
    finally:
        podman("rm", "-f", "-t", "0", "pgserver")
    assert [a for a, p in seen if int(p) == port] == [ip.rsplit(".", 1)[0] + ".1"] and port < ACL_LOW, (seen, port)


def test_nft_flush_ruleset_changes_nothing_on_the_wire(stack: Stack) -> None:
    """`nft flush ruleset` (the userland's nft): the owned table stays; containers and the host still pass; doctor
    says that Docker answers and that Docker's own nat rules are gone (a restart of dockerd brings them back)."""
    stack.ul.run(["nft", "flush", "ruleset"], ns=stack.ns)
    addr, port = stack.fetch()
    assert port >= ACL_LOW, (addr, port)
    assert stack.acl.connect() and stack.acl.ports[-1] >= ACL_LOW
    report = json.loads(stack.portguard("doctor", "--json").stdout)
    docker = {f["severity"]: f["message"] for f in report["findings"] if f["check"] == "docker"}
    assert f"Docker {stack.versions['docker']} answers" in docker["info"], docker
    assert "its own nat rules are missing" in docker["risk"] and "restart" in docker["risk"], docker


def test_dockerd_restart_changes_nothing_on_the_wire(stack: Stack) -> None:
    """dockerd stopped and started again (it rewrites its rules): containers still pass with a high port."""
    stack.ul.stop_dockerd(stack.ns)
    stack.ul.start_dockerd(stack.ns, stack.workdir / "dockerd.log")
    assert wait_for(lambda: stack.portguard("check").returncode == 0, 10), stack.log()
    addr, port = stack.fetch()
    assert addr == NEAR_IP and port >= ACL_LOW, (addr, port)


def test_portguard_killed_and_started_again_changes_nothing_on_the_wire(stack: Stack) -> None:
    """kill -9, then a new portguard: the standby translates meanwhile, the new one takes over."""
    assert stack.daemon is not None
    stack.daemon.stop(signal.SIGKILL)
    addr, port = stack.fetch()
    assert port >= ACL_LOW, (addr, port)
    stack.start_portguard()
    addr, port = stack.fetch("--network", "pghostip")
    assert addr == SECONDARY_IP and port >= ACL_LOW, (addr, port)


def test_check_doctor_and_render_say_true_things(stack: Stack) -> None:
    """check: healthy, owned by the running daemon; doctor: Docker's version and what it says of its firewall,
    no risk; render: the host_ipv4 network's SNAT."""
    check = json.loads(stack.portguard("check", "--json").stdout)
    assert check["healthy"] and check["owner"].startswith("another process"), check
    doctor = stack.portguard("doctor", "--json")
    report = json.loads(doctor.stdout)
    assert doctor.returncode == 0, [f for f in report["findings"] if f["severity"] == "risk"]
    docker = " ".join(f["message"] for f in report["findings"] if f["check"] == "docker")
    assert f"Docker {stack.versions['docker']} answers" in docker, docker
    major = int(stack.versions["docker"].split(".")[0])
    assert ("firewall backend is iptables" if major >= 28 else "firewall backend is unknown (Docker < 28") in docker
    assert any(f"network pghostip {HOSTIP_NET}: SNAT to {SECONDARY_IP}" in line for line in report["facts"]["traffic"])
    render = stack.portguard("render").stdout
    assert re.search(rf"ip saddr {re.escape(HOSTIP_NET)} .*snat ip to {re.escape(SECONDARY_IP)}:49152-61000", render)
    docker_rules = stack.ul.run(["iptables-save", "-t", "nat"], ns=stack.ns).stdout
    translating = [ln for ln in docker_rules.splitlines() if "MASQUERADE" in ln or "SNAT" in ln]
    stack.versions["docker_nat"] = "\n".join(translating)


# The cases every userland runs, in this order (a test module binds them: run_cases()).
CASES = (
    test_install_leaves_portguard_its_unit_completion_and_man_page_and_no_build_packages,
    test_default_network_container_leaves_with_the_egress_address_and_a_high_port,
    test_host_ipv4_network_leaves_with_its_snat_address,
    test_a_build_run_step_leaves_translated,
    test_host_traffic_from_a_secondary_address_keeps_it,
    test_nft_flush_ruleset_changes_nothing_on_the_wire,
    test_dockerd_restart_changes_nothing_on_the_wire,
    test_portguard_killed_and_started_again_changes_nothing_on_the_wire,
    test_check_doctor_and_render_say_true_things,
)
