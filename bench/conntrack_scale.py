"""Conntrack at scale: peak RSS of `portguard run` while its audit reads the table, and the time and memory of
one heal, at 100,000 real entries (UDP datagrams to many ports, in a namespace) and at 1,000,000 entries
(a stand-in `conntrack` on PATH printing a million real-format lines: the kernel's limit here is the host's
global nf_conntrack_max, 262,144, which a namespace may not raise).

    .venv/bin/python bench/conntrack_scale.py
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from daemonproc import PortguardDaemon
from helpers import keep_conntrack_on
from netns import Netns
from topology import SERVER_IP, AclNetwork

MAKE = """
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n // 65534 + 1)]
for i in range(n):
    socks[i // 65534].sendto(b"x", (host, i % 65534 + 1))
"""
# A stand-in conntrack: -L prints N lines (1 in 100 a stuck, untranslated SYN_SENT), -R counts its commands.
FAKE = """#!/usr/bin/env python3
import sys
n = int(open(sys.argv[0] + ".n").read())
if "-L" in sys.argv:
    out = sys.stdout
    for i in range(n):
        sport = 32768 + i % 8000
        if "tcp" in sys.argv and i % 100 == 0:
            out.write(f"tcp      6 119 SYN_SENT src=198.51.100.1 dst=198.51.100.2 sport={sport} dport=8080 "
                      f"[UNREPLIED] src=198.51.100.2 dst=198.51.100.1 sport=8080 dport={sport} mark=0 use=1\\n")
        else:
            port = i % 65534 + 1
            out.write(f"udp      17 29 src=198.51.100.1 dst=198.51.100.2 sport={sport} dport={port} "
                      f"[UNREPLIED] src=198.51.100.2 dst=198.51.100.1 sport={port} dport={sport} mark=0 use=1\\n")
elif "-R" in sys.argv:
    sum(1 for _ in sys.stdin)
"""
JOB = {"families": ["ipv4"], "protocols": ["tcp", "udp"], "source": [32768, 61000], "target": [49152, 61000],
       "interfaces": [], "excluded": ["lo", "docker0", "br-+"]}


def child(ns: Netns, kind: str, env: dict[str, str]) -> tuple[float, float, dict[str, object]]:
    """(seconds, peak RSS MB of the child, its answer) for one heal or audit, as the daemon runs it."""
    code = ("import json, resource, subprocess, sys, time\nt = time.time()\n"
            "p = subprocess.run([sys.executable, '-m', 'portguard.effects'], input=sys.argv[1], capture_output=True,"
            " text=True)\nprint(json.dumps([time.time() - t, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, json.loads(p.stdout)]))")
    out = ns.run([sys.executable, "-c", code, json.dumps({**JOB, "kind": kind})], env=env, timeout=600).stdout
    seconds, rss, answer = json.loads(out)
    return round(seconds, 2), round(rss, 1), answer


def daemon_peak(ns: Netns, work: Path, env: dict[str, str], seconds: float = 12.0) -> float:
    cfg = work / "pg.toml"
    cfg.write_text('protocols = ["tcp", "udp"]\n[daemon]\naudit_interval = 1\n')
    d = PortguardDaemon(ns, work, "--config", str(cfg), env={"DOCKER_HOST": "unix:///nonexistent", **env})
    try:
        assert d.wait_note("READY=1"), d.log_path.read_text()
        time.sleep(seconds)
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")) / 1024
    finally:
        d.close()


def main() -> None:
    env = {**os.environ}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ns = Netns("pgscale")
        acl = AclNetwork(ns)
        try:
            keep_conntrack_on(ns)
            acl.far.run(["iptables-nft", "-A", "INPUT", "-p", "udp", "-j", "DROP"])
            ns.run([sys.executable, "-c", MAKE, SERVER_IP, "100000"], timeout=120)
            entries = ns.run(["conntrack", "-C"]).stdout.strip()
            print(f"real table: {entries} entries")
            for kind in ("audit", "heal"):
                print(f"  {kind}: {child(ns, kind, env)[:2]} (seconds, child peak RSS MB)")
            print(f"  portguard run peak RSS with the audit every second: {daemon_peak(ns, work, env):.1f} MB")
            fake = work / "bin"
            fake.mkdir()
            (fake / "conntrack").write_text(FAKE)
            (fake / "conntrack").chmod(0o755)
            (fake / "conntrack.n").write_text("1000000")
            fenv = {**env, "PATH": f"{fake}:{env.get('PATH', '')}"}
            print("stand-in conntrack: 1,000,000 entries per listing")
            for kind in ("audit", "heal"):
                seconds, rss, answer = child(ns, kind, fenv)
                print(f"  {kind}: {seconds} s, child peak RSS {rss} MB, {answer}")
            print(f"  portguard run peak RSS with the audit every second: {daemon_peak(ns, work, fenv):.1f} MB")
        finally:
            acl.close()
            ns.close()
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
