"""``portguard demo``: the problem and the fix, live, in throwaway network namespaces.

    [demo host namespace: dockerd, portguard] --veth-- [remote namespace: stateless ACL + server]

The ACL rejects TCP from source ports below 49152, like an AWS NACL; the server records the
source port of every connection it accepts. Everything happens in namespaces this command
creates and removes (also on Ctrl-C); the machine's own namespace is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["end_processes", "run_demo", "unmount_below"]

SERVER_IP, HOST_IP, PORT, ACL_LOW = "198.51.100.2", "198.51.100.1", 8080, 49152
IMAGE = "portguard-demo-busybox:latest"
LOW_PORTS = "net.ipv4.ip_local_port_range=32768 40000"
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64); print("ready", flush=True)
while True:
    c, peer = s.accept(); print(peer[1], flush=True)
    try: c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n")
    except OSError: pass
    c.close()
"""
CLIENT = """
import socket, sys
try:
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=timeout); data = b""
    while chunk := s.recv(4096): data += chunk
    sys.exit(0 if data.endswith(b"ok\\n") else 3)
except OSError:
    sys.exit(1)
"""


@dataclass
class Row:
    scene: str
    client: str
    result: str
    source_port: int | None
    note: str = ""


class Lab:
    """The namespaces, processes and files of one demo; close() removes all of them."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}"
        self.host, self.remote = f"pgdemo-h-{tag}", f"pgdemo-r-{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix="portguard-demo-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.docker_host = f"unix://{self.tmp}/docker.sock"
        self.dockerd: subprocess.Popen[bytes] | None = None

    def ns(self, name: str, *cmd: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", name, *cmd], capture_output=True, text=True, check=False,
                              timeout=120, **kw)  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc  # type: ignore[no-any-return]

    def up(self) -> None:
        for name in (self.host, self.remote):
            subprocess.run(["ip", "netns", "add", name], check=True)
            self.ns(name, "ip", "link", "set", "lo", "up")
        self.ns(self.host, "ip", "link", "add", "pg0", "type", "veth", "peer", "name", "pg1", "netns", self.remote)
        self.ns(self.host, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "pg0")
        self.ns(self.host, "ip", "link", "set", "pg0", "up")
        self.ns(self.host, "ip", "route", "add", "default", "via", SERVER_IP)
        self.ns(self.remote, "ip", "addr", "add", f"{SERVER_IP}/24", "dev", "pg1")
        self.ns(self.remote, "ip", "link", "set", "pg1", "up")
        self.ns(self.remote, "iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", str(PORT), "-m", "tcp", "!",
                "--sport", f"{ACL_LOW}:65535", "-j", "REJECT", "--reject-with", "tcp-reset")
        server = self.spawn(["ip", "netns", "exec", self.remote, sys.executable, "-c", SERVER, SERVER_IP, str(PORT)],
                            stdout=subprocess.PIPE)
        if server.stdout is None or server.stdout.readline() != b"ready\n":
            raise RuntimeError("the demo server did not start")
        threading.Thread(target=self._read_ports, args=(server,), daemon=True).start()

    def _read_ports(self, server: subprocess.Popen[bytes]) -> None:
        for line in server.stdout or ():
            self.ports.append(int(line))

    def spawn(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def start_docker(self) -> str:
        """Start a dockerd in the demo's host namespace; "" when it runs, else why the demo goes without it."""
        busybox = shutil.which("busybox")
        if not shutil.which("dockerd") or not shutil.which("docker"):
            return "docker.io is not installed: host side only"
        if not busybox:
            return "busybox is not installed (the container image is made from it: apt install busybox-static)"
        log = (self.tmp / "dockerd.log").open("wb")
        self.dockerd = self.spawn(["nsenter", f"--net=/var/run/netns/{self.host}", "dockerd", "--data-root",
                                   str(self.tmp / "data"), "--exec-root", str(self.tmp / "exec"), "--pidfile",
                                   str(self.tmp / "dockerd.pid"), "-H", self.docker_host], stdout=log,
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self.docker("version", check=False).returncode != 0:
            if time.monotonic() > deadline or self.dockerd.poll() is not None:
                return f"dockerd did not start (log: {self.tmp / 'dockerd.log'})"
            time.sleep(0.2)
        tar = self.tmp / "busybox.tar"
        with tarfile.open(tar, "w") as t:
            t.add(busybox, "bin/busybox")
            for applet in ("sh", "wget"):
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                t.addfile(link)
        self.docker("import", str(tar), IMAGE)
        return ""

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "DOCKER_HOST": self.docker_host})
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def fetch(self, network: str | None = None) -> tuple[bool, int | None]:
        """One fetch through the ACL: from a container when Docker runs, else from the host's own stack."""
        before = len(self.ports)
        if self.dockerd is not None:
            net = ["--network", network] if network else []
            ok = self.docker("run", "--rm", "--sysctl", LOW_PORTS, *net, IMAGE, "wget", "-q", "-O", "-",
                             f"http://{SERVER_IP}:{PORT}/", check=False).returncode == 0
        else:
            ok = self.ns(self.host, sys.executable, "-c", CLIENT, SERVER_IP, str(PORT), check=False).returncode == 0
        time.sleep(0.05)
        return ok, (self.ports[-1] if len(self.ports) > before else None)

    def close(self) -> None:
        if self.dockerd is not None and self.dockerd.poll() is None:
            for cid in self.docker("ps", "-aq", check=False).stdout.split():
                self.docker("rm", "-f", cid, check=False)
        end_processes(reversed(self.procs), grace=15)
        with suppress(OSError, ValueError):
            os.kill(int((self.tmp / "exec" / "containerd" / "containerd.pid").read_text()), signal.SIGTERM)
        unmount_below(self.tmp)
        for name in (self.host, self.remote):
            # What the demo's portguard recorded for its namespace goes too, while the namespace still holds its
            # inode (a later namespace may get the same one).
            with suppress(OSError):
                shutil.rmtree(f"/run/portguard/net-{os.stat(f'/var/run/netns/{name}').st_ino}", ignore_errors=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def end_processes(procs: Iterable[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM to each process still running, in order; SIGKILL to one that has not exited ``grace`` seconds later."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def unmount_below(root: Path) -> None:
    """Detach every mount at or below ``root``, deepest first.

    dockerd (20.10 to 28) leaves two kinds behind when it exits: its image layers' overlay mounts under the
    data-root, and a bind mount of its network namespace at ``<exec-root>/netns/default`` - which keeps that
    namespace, its interfaces and its rules alive after `ip netns del`.
    """
    prefix = str(root.resolve()).rstrip("/")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    # The fifth field is the mount point, with space, tab, newline and backslash octal-escaped.
    points = {ln.split()[4] for ln in lines if len(ln.split()) > 4}
    for point in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@contextmanager
def _lab() -> Iterator[Lab]:
    lab = Lab()
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        lab.up()
        yield lab
    finally:
        lab.close()
        signal.signal(signal.SIGTERM, previous)


def run_demo(*, as_json: bool, out: Callable[[str], None] = print) -> int:
    """The scenes, as a table (or one JSON document: ``docker`` and ``scenes``); 0, 2 on error, 130 on Ctrl-C."""
    if os.geteuid() != 0:
        return _failed(as_json, out, "portguard demo needs root: it creates network namespaces (nothing in this "
                       "host's own)")
    rows: list[Row] = []
    without_docker = ""

    def row(scene: str, ok: bool, port: int | None, client: str, note: str = "") -> None:
        r = Row(scene, client, "passes ACL" if ok else "REJECTED", port, note)
        rows.append(r)
        if not as_json:
            out(f"{scene:<44} {client:<18} {r.result:<11} {port if port else '-':>6}  {note}")

    try:
        with _lab() as lab:
            without_docker = lab.start_docker()
            docker = not without_docker
            client = "container" if docker else "host (low ports)"
            if not docker:
                lab.ns(lab.host, "sysctl", "-qw", LOW_PORTS)
            if not as_json:
                out(f"ACL on {SERVER_IP}: TCP from source ports < {ACL_LOW} rejected"
                    + (f"  (without Docker: {without_docker})" if without_docker else ""))
                out(f"{'scene':<44} {'client':<18} {'result':<11} {'port':>6}")
            row("1. no rule", *lab.fetch(), client)
            if docker:
                lab.ns(lab.host, "iptables-nft", "-t", "nat", "-I", "POSTROUTING", "-p", "tcp", "-m", "tcp",
                       "--sport", "32768:61000", "-j", "MASQUERADE", "--to-ports", "49152-61000")
                row("2. bare seed rule", *lab.fetch(), client)
                lab.docker("network", "create", "--subnet", "10.99.0.0/24", "demo")
                row("3. seed rule after `docker network create`", *lab.fetch("demo"), "container on demo",
                    "Docker's MASQUERADE now runs first")
                lab.ns(lab.host, "iptables-nft", "-t", "nat", "-D", "POSTROUTING", "-p", "tcp", "-m", "tcp",
                       "--sport", "32768:61000", "-j", "MASQUERADE", "--to-ports", "49152-61000")
            # the demo shows the defaults, whatever this host's own configuration says
            env = {k: v for k, v in os.environ.items() if not k.startswith("PORTGUARD_")}
            env.update(DOCKER_HOST=lab.docker_host, PORTGUARD_LOG_FORMAT="json", PORTGUARD_CONFIG="/dev/null")
            log = (lab.tmp / "portguard.log").open("wb")
            lab.spawn(["ip", "netns", "exec", lab.host, sys.executable, "-m", "portguard", "run"], stdout=log,
                      stderr=subprocess.STDOUT, env=env)
            _wait(lambda: lab.ns(lab.host, sys.executable, "-m", "portguard", "check", check=False,
                                 env=env).returncode == 0)
            row("4. portguard run", *lab.fetch("demo" if docker else None), "container on demo" if docker else client,
                "nftables chain at srcnat-10 decides first")
            for scene, cmd, untouched in (
                    ("5. after `iptables -t nat -F`", ["iptables-nft", "-t", "nat", "-F"], "not affected (own table)"),
                    ("6. after `nft flush ruleset`", ["nft", "flush", "ruleset"],
                     "not affected (the kernel keeps the table of `portguard run`)")):
                mark = _log_lines(lab)
                lab.ns(lab.host, *cmd)
                _wait(lambda: lab.ns(lab.host, sys.executable, "-m", "portguard", "check", check=False,
                                     env=env).returncode == 0)
                took = _repair_ms(lab, mark)
                row(scene, *lab.fetch(), client, f"repaired in {took} ms" if took else untouched)
    except KeyboardInterrupt:
        out("interrupted: namespaces removed")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return _failed(as_json, out, str(exc))
    if as_json:
        out(json.dumps({"command": "demo", "exit": 0, "docker": {"used": not without_docker, "why_not": without_docker},
                        "scenes": [asdict(r) for r in rows]}, indent=2))
    return 0


def _failed(as_json: bool, out: Callable[[str], None], message: str) -> int:
    if as_json:
        out(json.dumps({"command": "demo", "exit": 2, "error": message}, indent=2))
    else:
        out(f"portguard demo: error: {message}")
    return 2


def _wait(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("portguard did not become healthy")
        time.sleep(0.1)


def _log_lines(lab: Lab) -> int:
    return len((lab.tmp / "portguard.log").read_text().splitlines())


def _repair_ms(lab: Lab, mark: int) -> float | None:
    for line in (lab.tmp / "portguard.log").read_text().splitlines()[mark:]:
        with suppress(ValueError):
            event = json.loads(line)
            # the standby table is not owned: a flush takes it and portguard rewrites it, which is no gap
            if event.get("event") == "rule.repaired" and event.get("rules") != ["standby"]:
                return float(event["took_ms"])
    return None
