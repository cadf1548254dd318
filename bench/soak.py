"""Soak: a fault every 2 s against `portguard run` and a real dockerd, a host connection from a low source port
every 50 ms through a REJECT ACL; prints failed connections, repairs by fault, portguard's CPU and RSS.

Fault mix (in turn): nat flush, deletion of portguard's rule, deletion of its table, `docker network create`
+ `rm`, `nft flush ruleset`, `iptables-nft-save | iptables-nft-restore`; every 10th fault a dockerd restart.

    .venv/bin/python bench/soak.py [--minutes 10] [--backends nftables,iptables-nft,iptables-legacy]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from daemonproc import PortguardDaemon
from dockerhost import DockerEngine
from helpers import xt
from netns import Netns
from topology import PORT, SERVER_IP, AclNetwork

PROBE = """
import socket, sys, time
host, port, every, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), time.time() + float(sys.argv[4])
while time.time() < end:
    t = time.time()
    try:
        s = socket.create_connection((host, port), timeout=2); s.recv(64); s.close(); ok = 1
    except OSError:
        ok = 0
    print(f"{t:.3f} {ok}", flush=True)
    time.sleep(max(0.0, every - (time.time() - t)))
"""
FAULTS = ["nat flush", "rule deleted", "table deleted", "network create+rm", "nft flush ruleset", "ruleset restore"]


def _stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / 100.0
    rss = next(int(ln.split()[1]) * 1024 for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
               if ln.startswith("VmRSS:"))
    return cpu, rss


def read_lines(proc: subprocess.Popen[bytes]) -> list[str]:
    """Collect a process's output lines on a thread, as they come."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode().strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines


def _fault(ns: Netns, engine: DockerEngine, backend: str, kind: str, n: int) -> None:
    tool = xt(backend)
    if kind == "nat flush":
        ns.run([tool, "-t", "nat", "-F"], check=False)
    elif kind == "rule deleted":
        if backend == "nftables":
            listing = ns.nft("-a", "list", "chain", "inet", "portguard", "postrouting", check=False)
            handle = next((ln.rsplit(" ", 1)[1] for ln in listing.splitlines() if "fib saddr" in ln), None)
            if handle:
                ns.run(["nft", "delete", "rule", "inet", "portguard", "postrouting", "handle", handle], check=False)
        else:
            ns.run([tool, "-t", "nat", "-D", "PORTGUARD", "4"], check=False)
    elif kind == "table deleted":
        if backend == "nftables":
            ns.run(["nft", "delete", "table", "inet", "portguard"], check=False)
        else:
            ns.run([tool, "-t", "nat", "-F", "PORTGUARD"], check=False)
    elif kind == "network create+rm":
        engine.docker("network", "create", f"soak{n}", check=False)
        engine.docker("network", "rm", f"soak{n}", check=False)
    elif kind == "nft flush ruleset":
        ns.run(["nft", "flush", "ruleset"], check=False)
    elif kind == "ruleset restore":
        saved = ns.run(["iptables-nft-save"], check=False).stdout
        ns.run(["iptables-nft-restore"], input=saved, check=False)


def soak(backend: str, minutes: float) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="pg-soak-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the daemon's log goes with it
    ns = Netns("pgsoak")
    acl = AclNetwork(ns)  # host connections from low ports (32768-40000), ACL rejects them unless translated
    engine = DockerEngine(ns)
    daemon: PortguardDaemon | None = None
    path = os.environ["PATH"]
    try:
        if backend == "iptables-legacy":
            # dockerd finds `iptables` on PATH: point it at the legacy tools, as on a legacy host
            legacy = work / "legacy-bin"
            legacy.mkdir()
            for tool in ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore",
                         "ip6tables-restore"):
                (legacy / tool).symlink_to(f"/usr/sbin/{tool.replace('tables', 'tables-legacy', 1)}")
            os.environ["PATH"] = f"{legacy}:{path}"
        engine.start()
        os.environ["PATH"] = path
        daemon = PortguardDaemon(ns, work, "--backend", backend, env={"DOCKER_HOST": engine.host,
                                                                        "PORTGUARD_LOG_LEVEL": "info"})
        assert daemon.wait_note("READY=1", timeout=30), daemon.log_path.read_text()
        pid = daemon.proc.pid
        seconds = minutes * 60
        probe = ns.popen([sys.executable, "-c", PROBE, SERVER_IP, str(PORT), "0.05", str(seconds)],
                         stdout=subprocess.PIPE)
        lines = read_lines(probe)  # read as written: a full pipe would stall the prober
        samples: list[tuple[float, float, int]] = []
        faults: list[tuple[float, str]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(5.0):
                samples.append((time.monotonic(), *_stat(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        samples.append((start, *_stat(pid)))
        n = 0
        while time.monotonic() - start < seconds - 2:
            n += 1
            kind = "dockerd restart" if n % 10 == 0 else FAULTS[(n - 1 - n // 10) % len(FAULTS)]
            faults.append((time.time(), kind))
            if kind == "dockerd restart":
                engine.stop(signal.SIGTERM)
                engine.start()
            else:
                _fault(ns, engine, backend, kind, n)
            time.sleep(max(0.0, start + 2.0 * n - time.monotonic()))
        probe.wait(30)
        results = [line.split() for line in lines]
        stop.set()
        samples.append((time.monotonic(), *_stat(pid)))
        failed = [float(t) for t, ok in results if ok == "0"]
        by_fault: Counter[str] = Counter()
        standby: Counter[str] = Counter()
        for e in daemon.named("rule.repaired"):
            when = time.mktime(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            # the log's timestamps are read to the second: a repair counts for the last fault before it
            cause = "start" if when + 1 < faults[0][0] else next((k for t, k in reversed(faults) if t <= when + 1),
                                                                 "start")
            (standby if e["rules"] == ["standby"] else by_fault)[cause] += 1
        after_minute = [s for s in samples if s[0] - start >= 60] or samples
        cpu = samples[-1][1] - samples[0][1]
        return {
            "backend": backend, "minutes": round((samples[-1][0] - start) / 60, 1), "probes": len(results),
            "failed": len(failed), "faults": len(faults), "repairs": dict(by_fault), "standby_repairs": dict(standby),
            "cpu_percent": round(100 * cpu / (samples[-1][0] - samples[0][0]), 2),
            "rss_mb_after_1_min": round(after_minute[0][2] / 1e6, 1), "rss_mb_end": round(samples[-1][2] / 1e6, 1),
            "rss_growth_percent": round(100 * (samples[-1][2] - after_minute[0][2]) / after_minute[0][2], 1),
            "alive": daemon.proc.poll() is None,
        }
    finally:
        if daemon is not None:
            daemon.close()
        engine.close()
        acl.close()
        ns.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--backends", default="nftables,iptables-nft,iptables-legacy")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        print(soak(backend, args.minutes), flush=True)


if __name__ == "__main__":
    main()
