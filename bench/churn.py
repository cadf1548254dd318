"""Container churn: what `docker run --rm` costs `portguard run` on a build host.

A real dockerd in a test namespace, a network that already exists, N containers started and removed one after the
other; portguard's CPU (its own and its children's) per container, the syncs the runs caused (count, p50 and
p99 from its histogram), and the same daemon's idle CPU over as long for comparison.

    .venv/bin/python bench/churn.py [--runs 100] [--backend nftables] [--source DIR]

``--source`` runs another checkout's portguard (a `git worktree` of an older commit, say) with this venv.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daemonproc import PortguardDaemon, scrape
from dockerhost import IMAGE, docker_lab


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its waited-for children (the conntrack child), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def histogram(body: str) -> tuple[float, dict[float, float]]:
    """(count, cumulative counts by bucket bound) of portguard_sync_duration_seconds."""
    buckets = {float(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'portguard_sync_duration_seconds_bucket\{le="([^"+]+)"\} (\S+)', body)}
    count = float(re.search(r"portguard_sync_duration_seconds_count (\S+)", body).group(1))  # type: ignore[union-attr]
    return count, buckets


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> str:
    """The bucket bound below which a share q of the syncs between two scrapes fell."""
    total = max(after.values()) - max(before.values()) if after else 0
    if total <= 0:
        return "-"
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0) >= q * total:
            return f"<= {bound * 1000:g} ms"
    return "> 5 s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--backend", default="nftables")
    parser.add_argument("--source", type=Path, help="run this checkout's portguard instead")
    args = parser.parse_args()
    env = {"PORTGUARD_LOG_LEVEL": "info"}
    if args.source:
        env["PYTHONPATH"] = str(args.source.resolve())
    work = Path(tempfile.mkdtemp(prefix="pg-churn-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the daemon's log goes with it
    with docker_lab("pgchurn", work) as lab:
        engine = lab.engine
        engine.docker("network", "create", "--subnet", "10.70.0.0/24", "pgchurn")
        # The periodic effect audit (a child reading conntrack every minute) is not what containers cost: off here.
        config = work / "pg.toml"
        config.write_text("[daemon]\naudit_interval = 3600\n")
        daemon = PortguardDaemon(lab.ns, work, "--backend", args.backend, "--config", str(config),
                                 env={**env, "DOCKER_HOST": engine.host})
        lab.stack.callback(daemon.close)
        assert daemon.wait_note("READY=1"), daemon.log_path.read_text()
        time.sleep(6)  # start-up done: Docker connected, its re-checks at 1, 2 and 4 s over
        wall0, cpu0 = time.monotonic(), cpu_seconds(daemon.proc.pid)
        count0, buckets0 = histogram(scrape(lab.ns, "/metrics")[1])
        for _ in range(args.runs):
            engine.docker("run", "--rm", "--network", "pgchurn", IMAGE, "true")
        took = time.monotonic() - wall0
        cpu1 = cpu_seconds(daemon.proc.pid)
        count1, buckets1 = histogram(scrape(lab.ns, "/metrics")[1])
        time.sleep(took)  # the same daemon, idle, as long
        cpu2 = cpu_seconds(daemon.proc.pid)
        per = (cpu1 - cpu0) / args.runs * 1000
        idle = (cpu2 - cpu1) / args.runs * 1000
        print(f"source: {args.source or 'this checkout'}  backend: {args.backend}  "
              f"docker: {engine.docker('version', '--format', '{{.Server.Version}}').stdout.strip()}")
        print(f"{args.runs} docker run --rm on an existing network in {took:.1f} s")
        print(f"portguard CPU: {per:.2f} ms per container ({idle:.2f} ms of it is what the same daemon spends idle "
              f"in as long: {per - idle:.2f} ms caused by the containers)")
        print(f"syncs during the runs: {count1 - count0:.0f} (p50 {quantile(0.5, buckets0, buckets1)}, "
              f"p99 {quantile(0.99, buckets0, buckets1)})")

if __name__ == "__main__":
    main()
