"""`portguard run` against a real dockerd under faults; container traffic through a stateless ACL is the judge.

One engine per backend, in a namespace of its own; the tests run in file order and each injects one
fault, then requires a container on the affected network to reach the server with a translated port.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemonproc import PortguardDaemon
from dockerhost import IMAGE, DockerEngine, docker_lab, run_once
from helpers import NFT_RULES, XT_V4_LINES, bystander_nft, bystander_setup, bystander_snapshot, delete_rule, owned_lines
from netns import Netns, wait_for
from topology import ACL_LOW, SERVER_IP, AclNetwork

pytestmark = [pytest.mark.netns, pytest.mark.docker]
LEGACY = ("iptables-legacy",)
LOW_PORTS = "net.ipv4.ip_local_port_range=32768 40000"  # every container port below the ACL's range


@dataclass
class Env:
    ns: Netns
    acl: AclNetwork
    engine: DockerEngine
    backend: str
    workdir: Path
    pre_portguard_save: str
    daemon: PortguardDaemon

    def start_portguard(self) -> None:
        self.daemon = PortguardDaemon(self.ns, self.workdir, "--backend", self.backend,
                                      env={"DOCKER_HOST": self.engine.host})
        assert self.daemon.wait_note("READY=1"), self.daemon.log_path.read_text()

    def healthy(self) -> bool:
        return self.ns.portguard("check", "--backend", self.backend).returncode == 0

    def fetch(self, network: str | None = None) -> None:
        """A container (low source ports forced) fetches from the server behind the ACL.

        (No `-T`: Debian 12's busybox-static 1.35 wget segfaults with a timeout option.)
        """
        net = ["--network", network] if network else []
        before = len(self.acl.ports)
        out = run_once(self.engine.docker, "--sysctl", LOW_PORTS, *net, IMAGE,
                       "wget", "-q", "-O", "-", f"http://{SERVER_IP}:8080/")
        assert out.returncode == 0 and out.stdout == "ok\n", (out.returncode, out.stdout, out.stderr,
                                                              self.daemon.log_path.read_text())
        assert len(self.acl.ports) > before and self.acl.ports[-1] >= ACL_LOW, self.acl.ports

    def bystanders(self) -> str:
        return bystander_snapshot(self.ns, LEGACY)

    def one_copy(self, *, primary: bool = True) -> None:
        """Exactly one copy of every rule (nftables: in the standby always, in the owned table while running): the
        defaults plus one masquerade per Docker network and family Docker masquerades."""
        networks = self.engine.docker("network", "ls", "-q", "--filter", "driver=bridge").stdout.split()
        lines = owned_lines(self.ns, self.backend)
        expected = NFT_RULES + len(networks) if self.backend == "nftables" else XT_V4_LINES + len(networks)
        assert len(lines) == len(set(lines)) == (expected if primary else 0), lines
        if self.backend == "nftables":
            standby = owned_lines(self.ns, self.backend, table="portguard_standby")
            assert len(standby) == len(set(standby)) == NFT_RULES + len(networks), standby


@pytest.fixture(scope="module", params=["nftables", "iptables-nft"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("docker")
    with docker_lab("pgdk", workdir) as lab:
        ns, engine = lab.ns, lab.engine
        # A ruleset saved before portguard ever ran (Docker's own rules), for the restore fault.
        pre = ns.run(["iptables-nft-save"]).stdout
        engine.stop()
        # Bystanders where the destructive faults (nft-flavour flushes, restores) don't reach.
        bystander_setup(ns, seed_copy=False, flavours=LEGACY)
        e = Env(ns, lab.acl, engine, request.param, workdir, pre, daemon=None)  # type: ignore[arg-type]
        lab.stack.callback(lambda: e.daemon is not None and e.daemon.close())  # the one running at the end
        e.start_portguard()  # portguard first, dockerd after it
        engine.start()
        yield e


def test_portguard_started_before_dockerd(env: Env) -> None:
    """Started before dockerd, portguard keeps working once dockerd inserts its rules: containers get through."""
    assert wait_for(env.healthy, 10)
    env.fetch()


def test_without_a_working_rule_the_acl_rejects_the_container(env: Env) -> None:
    """Control: with portguard gone and its rules removed, the same container fetch fails; a new portguard takes
    over at once.  (With nftables a running portguard's table cannot be removed at all: it is killed first.)"""
    if env.backend == "nftables":
        env.daemon.stop(signal.SIGKILL)
        env.daemon.close()
        env.ns.nft("delete", "table", "inet", "portguard_standby")
    else:
        env.daemon.send(signal.SIGSTOP)
        env.ns.run(["iptables-nft", "-t", "nat", "-F", "PORTGUARD"])
    try:
        out = run_once(env.engine.docker, "--sysctl", LOW_PORTS, IMAGE, "wget", "-q", "-O", "-",
                       f"http://{SERVER_IP}:8080/")
        assert out.returncode != 0 and "wget:" in out.stderr, (out.returncode, out.stdout, out.stderr)
    finally:
        if env.backend == "nftables":
            env.start_portguard()
        else:
            env.daemon.send(signal.SIGCONT)
    assert wait_for(env.healthy, 5)
    env.fetch()


def test_network_create_then_container_on_the_new_network(env: Env) -> None:
    """`docker network create` puts Docker's MASQUERADE at position 1; a container on that network still gets out."""
    before = env.bystanders()
    env.engine.docker("network", "create", "pgnet")
    env.fetch("pgnet")
    assert wait_for(env.healthy, 5)
    env.one_copy()
    assert env.bystanders() == before


def test_nat_table_flush(env: Env) -> None:
    """`iptables -t nat -F` is repaired; containers get through."""
    env.ns.run(["iptables-nft", "-t", "nat", "-F"])
    assert wait_for(env.healthy, 5)
    env.fetch()


def test_portguard_rule_deleted(env: Env) -> None:
    """Deleting portguard's rule by hand is refused by the kernel (nftables, owned table) or repaired
    (iptables-nft); bystanders stay unchanged."""
    before = env.bystanders()
    assert delete_rule(env.ns, env.backend, check=False) is (env.backend != "nftables")
    assert wait_for(env.healthy, 5)
    env.fetch()
    assert env.bystanders() == before


def test_iptables_restore_of_a_ruleset_saved_before_portguard(env: Env) -> None:
    """Restoring an old save (boot scripts do) is repaired; containers get through."""
    env.ns.run(["iptables-nft-restore"], input=env.pre_portguard_save)
    assert wait_for(env.healthy, 5)
    env.fetch()


def test_nft_flush_ruleset_then_dockerd_restart(env: Env) -> None:
    """`nft flush ruleset` wipes Docker's and portguard's rules: portguard is back at once and covers containers;
    a dockerd restart (SIGTERM + start) then rebuilds Docker's rules above portguard's and is repaired too."""
    env.ns.nft("flush", "ruleset")
    assert wait_for(env.healthy, 5)
    env.fetch()
    bystander_nft(env.ns)  # the flush took the native bystander table; from here on it must survive
    before = env.bystanders()
    env.engine.stop(signal.SIGTERM)
    env.engine.start()
    assert wait_for(env.healthy, 10)
    env.fetch()
    env.fetch("pgnet")
    env.one_copy()
    assert env.bystanders() == before


def test_dockerd_sigkill_and_start(env: Env) -> None:
    """dockerd killed with SIGKILL and started again: the stream's end is noticed, Docker's re-inserted rules
    are repaired, containers on both networks get through."""
    before = env.bystanders()
    seen = len(env.daemon.named("docker.disconnected"))
    env.engine.stop(signal.SIGKILL)
    assert env.daemon.wait_event("docker.disconnected", timeout=10, count=seen + 1)
    env.engine.start()
    assert wait_for(env.healthy, 10)
    env.fetch("pgnet")
    env.fetch()
    env.one_copy()
    assert env.bystanders() == before


def test_dockerd_sighup(env: Env) -> None:
    """SIGHUP to dockerd (a reload event) changes nothing harmful: still healthy, containers get through."""
    before = env.bystanders()
    env.engine.hup()
    time.sleep(0.5)
    assert wait_for(env.healthy, 5)
    env.fetch()
    assert env.bystanders() == before


def test_docker_build_run_step_fetches_through_the_acl(env: Env) -> None:
    """A legacy-builder `docker build` whose RUN step fetches 8 times from the server succeeds, all translated."""
    ctx = env.workdir / f"build-{env.backend}"
    ctx.mkdir()
    fetch = f"wget -q -O - http://{SERVER_IP}:8080/ | grep -q ok"
    (ctx / "Dockerfile").write_text(f"FROM {IMAGE}\nRUN " + " && ".join([fetch] * 8) + "\n")
    before = len(env.acl.ports)
    out = env.engine.docker("build", "--no-cache", "-t", "pg-built", str(ctx), env={"DOCKER_BUILDKIT": "0"},
                            check=False, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    new = env.acl.ports[before:]
    assert len(new) == 8 and all(p >= ACL_LOW for p in new), new


def test_portguard_sigkill_and_start_leaves_exactly_one_copy(env: Env) -> None:
    """A SIGKILLed portguard restarted finds its own rules and keeps exactly one copy."""
    before = env.bystanders()
    env.daemon.stop(signal.SIGKILL)
    env.daemon.close()
    env.one_copy(primary=env.backend != "nftables")  # the owned table died with its owner; the standby holds
    env.fetch("pgnet")
    env.start_portguard()
    env.one_copy()
    env.engine.docker("network", "create", "pgnet2")
    env.fetch("pgnet2")
    env.one_copy()
    assert env.bystanders() == before


def test_sigterm_exits_0_quickly_with_the_rule_in_place(env: Env) -> None:
    """SIGTERM: exit 0 within 2 s, the rule stays, and containers keep getting through afterwards."""
    code, took = env.daemon.stop(signal.SIGTERM)
    assert code == 0 and took < 2.0, (code, took)
    assert env.healthy()
    env.fetch()
