"""Other Debian userlands on this kernel: Debian 12, 13 and unstable, each with its own Docker, Python, nft and
iptables.

A userland is made once with ``debootstrap --variant=minbase`` through the Debian registry and cached under
``CACHE`` (a pristine root with the runtimes installed, but not portguard and not what its installer brings).
Every test module then works on a copy-on-write view of it: an overlay mounted in a private mount namespace
that one long-lived "holder" process keeps; every command enters that mount namespace (and, when asked, a test
network namespace) and chroots into the view.  Mounts go away with the holder; nothing is mounted in this
machine's own mount namespace, and the cached root is never changed.

Traps that cost time (ENVIRONMENT.md): dockerd wants its root to be a mount point (the overlay is one) and its
data-root off overlayfs (overlay2 on overlayfs is refused: a directory of this machine is bound there); a test
network namespace has no route to the registry, so packages are installed in this machine's network namespace,
with ``policy-rc.d`` refusing to start any service there; unstable's index is served from a snapshot that apt
calls expired; pip behind this machine's proxy needs its CA certificates and pip.conf.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from netns import REPO, Netns

from portguard.demo import end_processes

__all__ = ["CACHE", "ENV", "PLATFORM_ROWS", "SUITES", "Booted", "Suite", "Userland", "debian_mirror", "record_platform"]

CACHE = Path(os.environ.get("PG_TEST_CACHE", "/var/cache/portguard-test"))
RECIPE = "4"  # bump when the way a base is made changes: the cache key changes with it
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
       "DEBIAN_FRONTEND": "noninteractive"}
# What portguard's installer brings (scripts/install.sh): downloaded into the base's apt cache so that each
# run installs it from there, but never installed in the base, so the installer meets a minimal host.
INSTALLER_DEBS = ("iptables", "nftables", "conntrack", "python3", "python3-venv", "gcc", "libc6-dev", "python3-dev")


@dataclass(frozen=True)
class Suite:
    name: str
    packages: tuple[str, ...]
    systemd_boots: bool  # its systemd runs under systemd-nspawn on this machine (unstable's 262 refuses hybrid cgroups)
    buildx: bool  # Debian packages docker-buildx for it
    docker_gateway_modes: bool = False  # its Docker (>= 27) has com.docker.network.bridge.gateway_mode_ipv4
    extra_apt: str = ""

    @property
    def key(self) -> str:
        text = f"{RECIPE} {self.name} {' '.join(self.packages)} {self.extra_apt} {' '.join(INSTALLER_DEBS)}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_COMMON = ("docker.io", "iproute2", "procps")
_SYSTEMD = ("systemd", "systemd-sysv", "dbus")
SUITES = {
    "bookworm": Suite("bookworm", (*_COMMON, *_SYSTEMD), systemd_boots=True, buildx=False),
    # From Debian 13 on, docker.io's client is a package of its own (docker-cli).
    "trixie": Suite("trixie", (*_COMMON, "docker-cli", "docker-buildx", *_SYSTEMD), systemd_boots=True, buildx=True),
    "sid": Suite("sid", (*_COMMON, "docker-cli", "docker-buildx", "podman", "netavark", "runc"), systemd_boots=False,
                 buildx=True,
                 docker_gateway_modes=True, extra_apt='Acquire::Check-Valid-Until "false";\n'),
}


# Where each userland's versions go for the README's "Tested platforms" table (written by conftest.py).
PLATFORM_ROWS = REPO / ".pytest-platforms"


def record_platform(suite: str, versions: dict[str, str]) -> None:
    PLATFORM_ROWS.mkdir(exist_ok=True)
    (PLATFORM_ROWS / f"{suite}.json").write_text(json.dumps(versions))


def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        text = path.read_text() if path.is_file() else ""
        found = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+\w+", text, re.M)
        if found:
            return found.group(1)
    raise AssertionError("no Debian mirror in /etc/apt sources")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder of a cached thing at a time, across test processes (pytest-xdist workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _run(argv: Sequence[str], *, timeout: float = 900, what: str = "") -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{what or argv[0]} exited {proc.returncode}: {proc.stdout[-2500:]}{proc.stderr[-2500:]}")
    return proc.stdout


def _prepare_root(root: Path, suite: Suite) -> None:
    """What a root needs before apt can run in it here: DNS, this machine's proxy CAs and pip config, no services."""
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf", follow_symlinks=True)
    for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy2(crt, root / "usr/local/share/ca-certificates" / crt.name)
    if Path("/etc/pip.conf").exists():
        shutil.copy2("/etc/pip.conf", root / "etc/pip.conf")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# portguard's tests: maintainer scripts never start a service here\nexit 101\n")
    policy.chmod(0o755)
    if suite.extra_apt:
        (root / "etc/apt/apt.conf.d/99portguard-test").write_text(suite.extra_apt)


_BUILD = """
set -e
mount -t proc proc "$R/proc"; mount --rbind /sys "$R/sys"; mount --rbind /dev "$R/dev"
run() { chroot "$R" /usr/bin/env -i PATH="$P" HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }
run update-ca-certificates >/dev/null
run apt-get update -qq
run apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
run apt-get install -y -qq --no-install-recommends --download-only $DEBS >/dev/null
"""


def base(suite: Suite) -> Path:
    """The cached pristine root of ``suite`` (made on first use: debootstrap plus the runtimes, a few minutes)."""
    final = CACHE / f"userland-{suite.name}-{suite.key}"
    with _locked(CACHE / f"userland-{suite.name}.lock"):
        if final.is_dir():
            return final
        for stale in CACHE.glob(f"userland-{suite.name}-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)  # an older recipe's
        staging = CACHE / f"staging-{suite.name}-{suite.key}"
        shutil.rmtree(staging, ignore_errors=True)
        _run(["debootstrap", "--variant=minbase", "--include=ca-certificates", suite.name, str(staging),
              debian_mirror()], timeout=1500, what=f"debootstrap {suite.name}")
        _prepare_root(staging, suite)
        env = {**os.environ, "R": str(staging), "P": ENV["PATH"], "PACKAGES": " ".join(suite.packages),
               "DEBS": " ".join(INSTALLER_DEBS)}
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", _BUILD], env=env,
                              capture_output=True, text=True, timeout=1500, check=False)
        assert proc.returncode == 0, f"packages for {suite.name}: {proc.stdout[-2500:]}{proc.stderr[-2500:]}"
        staging.rename(final)
        return final


_HOLD = """
set -e
mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$W/upper,workdir=$W/work" "$R"
mkdir -p "$R/var/lib/docker" "$R/var/lib/containers"
mount --bind "$W/docker" "$R/var/lib/docker"
mount --bind "$W/containers" "$R/var/lib/containers"
if [ "$BOOT" != 1 ]; then
    mount -t proc proc "$R/proc"; mount --rbind /sys "$R/sys"; mount --rbind /dev "$R/dev"
    mount --bind "$W/run" "$R/run"; mount -t tmpfs tmpfs "$R/tmp"
fi
echo ready
exec sleep infinity
"""


@dataclass
class Userland:
    """A copy-on-write view of a cached userland, entered through one private mount namespace.

    ``boot``: the view is for systemd-nspawn (no /proc, /sys, /dev or /run of ours in it: nspawn mounts its own).
    """

    suite: Suite
    boot: bool = False
    work: Path = field(init=False)
    root: Path = field(init=False)
    holder: subprocess.Popen[str] = field(init=False)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    dockerd: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.work = Path(f"/var/tmp/pgu-{os.getpid()}-{self.suite.name}-{time.monotonic_ns() % 10**9}")
        for d in ("upper", "work", "docker", "containers", "run", "root"):
            (self.work / d).mkdir(parents=True)
        self.root = self.work / "root"
        self._hold()

    def _hold(self) -> None:
        env = {**os.environ, "LOWER": str(base(self.suite)), "W": str(self.work), "R": str(self.root),
               "BOOT": "1" if self.boot else "0"}
        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c", _HOLD], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line != "ready\n":
            self.holder.wait(10)
            why = self.holder.stderr.read() if self.holder.stderr else ""
            raise AssertionError(f"userland {self.suite.name}: {why}")

    def remount(self, *, boot: bool) -> None:
        """The same view (what was written stays), mounted anew for a chroot or for systemd-nspawn to boot."""
        self._release()
        self.boot = boot
        self._hold()

    @property
    def run_dir(self) -> Path:
        """This machine's view of the userland's /run (its docker.sock, notify sockets)."""
        return self.work / "run"

    def argv(self, cmd: Sequence[str], *, ns: Netns | None = None, env: dict[str, str] | None = None) -> list[str]:
        enter = ["nsenter", "-t", str(self.holder.pid), "-m"]
        if ns is not None:
            enter.append(f"--net={ns.path}")
        variables = [f"{k}={v}" for k, v in {**ENV, **(env or {})}.items()]
        return [*enter, "chroot", str(self.root), "/usr/bin/env", "-i", *variables, *cmd]

    def run(self, cmd: Sequence[str], *, ns: Netns | None = None, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(cmd, ns=ns, env=env), capture_output=True, text=True, timeout=timeout,
                              check=False, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{self.suite.name}] {' '.join(cmd)} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, cmd: Sequence[str], *, ns: Netns | None = None, env: dict[str, str] | None = None,
              **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv(cmd, ns=ns, env=env), **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def put(self, files: dict[str, bytes], mode: int = 0o644) -> None:
        """Write files into the view (paths inside the userland).  The overlay is mounted only in the holder's
        mount namespace, so the bytes go in through it."""
        for path, data in files.items():
            subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "sh", "-c",
                            f'mkdir -p "$(dirname "$0")" && cat >"$0" && chmod {mode:o} "$0"', f"{self.root}{path}"],
                           input=data, check=True, timeout=60)

    def copy_checkout(self, dest: str = "/root/portguard") -> str:
        """The checkout's files, as a clone of the working tree has them, at ``dest`` in the userland."""
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.splitlines()
        files = [f for f in files if (REPO / f).is_file() or (REPO / f).is_symlink()]
        tar = subprocess.run(["tar", "-C", str(REPO), "-cf", "-", *files], capture_output=True, check=True).stdout
        subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "sh", "-c",
                        'mkdir -p "$0" && tar -C "$0" -xf -', f"{self.root}{dest}"], input=tar, check=True, timeout=120)
        return dest

    def install_portguard(self) -> subprocess.CompletedProcess[str]:
        """scripts/install.sh from the checkout's root, as the README says, in this machine's network namespace
        (the registry is reachable only from here; policy-rc.d keeps every service from starting)."""
        where = self.copy_checkout()
        return self.run(["bash", "-c", f"cd {where} && ./scripts/install.sh"], timeout=900)

    # ---- the userland's own dockerd, in a test network namespace ----

    def start_dockerd(self, ns: Netns, log: Path) -> None:
        with log.open("ab") as out:
            self.dockerd = self.popen(["dockerd", "-H", "unix:///run/docker.sock", "--pidfile", "/run/docker.pid"],
                                      ns=ns, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while self.run(["docker", "version"], ns=ns, check=False, timeout=30).returncode != 0:
            if time.monotonic() > deadline or self.dockerd.poll() is not None:
                raise AssertionError(f"[{self.suite.name}] dockerd did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop_dockerd(self, ns: Netns) -> None:
        """SIGTERM to the userland's dockerd (containers removed first), and wait for it and its containerd."""
        ids = self.run(["docker", "ps", "-aq"], ns=ns, check=False).stdout.split()
        if ids:
            self.run(["docker", "rm", "-f", *ids], ns=ns, check=False)
        if self.dockerd is not None and self.dockerd.poll() is None:
            self.dockerd.send_signal(signal.SIGTERM)
            self.dockerd.wait(60)
        self.dockerd = None

    def docker(self, ns: Netns, *args: str, check: bool = True, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(["docker", *args], ns=ns, check=check, timeout=timeout, env=env)

    def package_version(self, package: str) -> str:
        return self.run(["dpkg-query", "-W", "-f=${Version}", package]).stdout.strip()

    def installed(self) -> set[str]:
        out = self.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Package}\\n"]).stdout
        return {line.split()[1] for line in out.splitlines() if line.startswith("ii")}

    def close(self) -> None:
        self._release()
        shutil.rmtree(self.work, ignore_errors=True)

    def _release(self) -> None:
        """End every process started here, then the holder: the mount namespace and its mounts go with them."""
        end_processes(reversed(self.procs), grace=20)
        self.procs.clear()
        for pid in self._strays():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)

    def _strays(self) -> set[int]:
        """Processes still in the view's mount namespace, and everything below them: daemons that left our process
        tree, such as Podman's conmon (it double-forks to PID 1) and the container it keeps."""
        if self.holder.poll() is not None:
            return set()
        view = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        children: dict[int, list[int]] = {}
        found: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.holder.pid:
                continue
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                mnt = os.readlink(f"/proc/{entry}/ns/mnt")
            except OSError:
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
            if mnt == view:
                found.add(int(entry))
        todo = list(found)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found


class Booted:
    """A userland's own systemd, booted with systemd-nspawn in a test network namespace (its view remounted for
    booting), entered with nsenter through its PID 1."""

    def __init__(self, ul: Userland, ns: Netns, log: Path) -> None:
        ul.remount(boot=True)
        self.ul = ul
        with log.open("ab") as out:
            self.nspawn = subprocess.Popen(
                ["nsenter", "-t", str(ul.holder.pid), "-m", "systemd-nspawn", "-q", "-b", "--register=no",
                 "--keep-unit", "--console=passive", "--capability=CAP_NET_ADMIN,CAP_NET_RAW", "-D", str(ul.root),
                 f"--network-namespace-path={ns.path}"], stdout=out, stderr=subprocess.STDOUT)
        ul.procs.append(self.nspawn)
        self.pid1 = 0
        deadline = time.monotonic() + 120
        while not self.pid1 or self.systemctl("is-system-running", check=False).stdout.strip() not in (
                "running", "degraded"):
            if time.monotonic() > deadline or self.nspawn.poll() is not None:
                raise AssertionError(f"[{ul.suite.name}] systemd did not boot: {log.read_text()[-3000:]}")
            self.pid1 = self.pid1 or _descendant(self.nspawn.pid, "systemd")
            time.sleep(0.5)

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", *cmd]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{self.ul.suite.name}] {' '.join(cmd)} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def journal(self, *args: str) -> list[dict[str, str]]:
        out = self.run(["journalctl", "--no-pager", "-o", "json", "-u", "portguard", *args]).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def poweroff(self) -> None:
        """SIGTERM to systemd-nspawn shuts the container down cleanly (its init gets SIGRTMIN+3)."""
        if self.nspawn.poll() is None:
            self.nspawn.terminate()
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)


def _descendant(pid: int, comm: str) -> int:
    """The first process below ``pid`` whose name is ``comm`` (the container's PID 1, as this machine sees it)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        child = int(stat.parent.name)
        names[child] = name
        children.setdefault(ppid, []).append(child)
    queue = list(children.get(pid, []))
    while queue:
        p = queue.pop(0)
        if names.get(p) == comm:
            return p
        queue += children.get(p, [])
    return 0
