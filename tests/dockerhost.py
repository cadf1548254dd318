"""A real dockerd (Debian's docker.io) in a test namespace, and a busybox image made with `docker import`."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from netns import Netns, wait_for
from topology import AclNetwork

from portguard.demo import unmount_below

__all__ = ["IMAGE", "DockerEngine", "DockerLab", "busybox_tar", "docker_lab", "run_once"]

IMAGE = "pg-busybox:latest"
PR_SET_CHILD_SUBREAPER = 36
_ids = itertools.count()


def busybox_tar(dest: Path) -> Path:
    """A root file system holding Debian's static busybox and a few applets, as a tar for `docker import`."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    tar_path = dest / "busybox-rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for d in ("bin", "etc", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in ("sh", "wget", "nc", "sleep", "seq", "echo", "cat", "grep", "true"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return tar_path


def run_once(docker: Callable[..., subprocess.CompletedProcess[str]], *args: str) -> subprocess.CompletedProcess[str]:
    """``docker run ARGS`` for a container that exits at once, as (exit code, stdout, stderr): created detached,
    waited for, its log read, then removed.  A foreground `docker run --rm` of a container this short-lived once
    handed back neither the output nor an error message (Docker 26.1.5), which read as a failed fetch; the exit
    code from `docker wait` and the json-file log do not depend on the CLI attaching in time."""
    cid = docker("run", "-d", *args).stdout.strip()
    try:
        code = int(docker("wait", cid).stdout.strip())
        logs = docker("logs", cid)
    finally:
        docker("rm", "-f", cid, check=False)
    return subprocess.CompletedProcess(["docker", "run", *args], code, logs.stdout, logs.stderr)


class DockerEngine:
    """dockerd with its own data-root, exec-root, pidfile and socket, started with nsenter in ``ns``."""

    def __init__(self, ns: Netns) -> None:
        # Orphans of dockerd (its containerd after a SIGKILL) become our children, not PID 1's:
        # this machine's PID 1 does not reap them.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self.ns = ns
        self.root = Path(f"/tmp/pgd-{os.getpid()}-{next(_ids)}")
        self.root.mkdir(parents=True)
        self.sock = self.root / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.pidfile = self.root / "dockerd.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, check: bool = True, timeout: float = 120,
               env: dict[str, str] | None = None, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, check=False,
                              env={**self.env(), **(env or {})}, input=input)
        out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                          proc.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
        return out

    def start(self) -> None:
        log = (self.root / "dockerd.log").open("ab")
        self.proc = self.ns.popen(
            ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.pidfile), "-H", self.host],
            nsenter=True, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        ok = wait_for(self._answers, timeout=60, interval=0.2)
        assert ok, (self.root / "dockerd.log").read_text()[-3000:]

    def _answers(self) -> bool:
        try:
            return self.docker("version", check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(60)
        self.proc = None
        if sig == signal.SIGKILL:
            self._reap_containerd()

    def _reap_containerd(self) -> None:
        """dockerd's managed containerd exits with it; as its subreaper we collect it, as init would.

        Left a zombie, its PID still looks alive and the next dockerd waits forever to reach it.
        """
        for pidfile in (self.root / "exec").glob("containerd/containerd.pid"):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break  # not ours to reap (already gone, or adopted elsewhere)
                if done:
                    break
                time.sleep(0.05)

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.docker("rm", "-f", *self.docker("ps", "-aq", check=False).stdout.split(), check=False)
            self.stop(signal.SIGTERM)
        for pidfile in (self.root / "exec").glob("containerd/containerd.pid"):
            _kill_pidfile(pidfile)
        unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class DockerLab:
    """A test namespace behind the ACL, its running dockerd holding the busybox image, and the stack that takes them
    down: ``stack.callback(daemon.close)`` makes a daemon go first."""

    ns: Netns
    acl: AclNetwork
    engine: DockerEngine
    stack: contextlib.ExitStack


@contextlib.contextmanager
def docker_lab(name: str, work: Path, *, low_ports: bool = False) -> Iterator[DockerLab]:
    """Make a DockerLab (``low_ports``: the host's own connections come from 32768-40000, see AclNetwork); remove all
    of it, in reverse, however the block ends."""
    with contextlib.ExitStack() as stack:
        ns = Netns(name)
        stack.callback(ns.close)
        acl = AclNetwork(ns, low_ports=low_ports)
        stack.callback(acl.close)
        engine = DockerEngine(ns)
        stack.callback(engine.close)
        engine.start()
        engine.docker("import", str(busybox_tar(work)), IMAGE)
        yield DockerLab(ns, acl, engine, stack)


def _kill_pidfile(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
