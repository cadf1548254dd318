"""Idle cost of `portguard run` next to a real dockerd: CPU share and RSS after --seconds with nothing to do.
With --without-docker, on a host without dockerd (a containerd or Podman node): its socket's directory exists,
the socket does not.

    .venv/bin/python bench/idle.py [--seconds 60] [--backends nftables,iptables-nft,iptables-legacy] [--source DIR]
                                   [--without-docker]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daemonproc import PortguardDaemon
from dockerhost import DockerEngine
from netns import Netns
from soak import _stat


def idle(backend: str, seconds: float, source: Path | None = None, docker: bool = True) -> dict[str, object]:
    ns = Netns("pgidle")
    engine = DockerEngine(ns)
    d: PortguardDaemon | None = None
    try:
        if docker:
            engine.start()
        work = Path(tempfile.mkdtemp(prefix="pg-idle-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)  # the daemon's log goes with it
        d = PortguardDaemon(ns, work, "--backend", backend,
                            env={"DOCKER_HOST": engine.host, "PORTGUARD_LOG_LEVEL": "info",
                                 **({"PYTHONPATH": str(source.resolve())} if source else {})})
        assert d.wait_note("READY=1"), d.log_path.read_text()
        time.sleep(5)  # start-up done (imports, first syncs, Docker connected)
        cpu0, _ = _stat(d.proc.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        cpu1, rss = _stat(d.proc.pid)
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        hwm = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")) * 1024
        return {"backend": backend, "docker": docker,
                "cpu_percent": round(100 * (cpu1 - cpu0) / (time.monotonic() - t0), 3),
                "rss_mb": round(rss / 1e6, 1), "peak_rss_mb": round(hwm / 1e6, 1)}
    finally:
        if d is not None:
            d.close()
        engine.close()
        ns.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backends", default="nftables,iptables-nft,iptables-legacy")
    parser.add_argument("--source", type=Path, help="run another checkout's portguard (an older commit's worktree)")
    parser.add_argument("--without-docker", action="store_true", help="no dockerd: a containerd or Podman node")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        print(idle(backend, args.seconds, args.source, docker=not args.without_docker), flush=True)


if __name__ == "__main__":
    main()
