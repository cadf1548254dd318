"""Daemon figures against a real dockerd, in a throwaway namespace: repair latency per fault (p50/p99),
the same with 50,000 foreign nat rules, idle CPU and RSS, and a burst of `docker network create`.

Latency is read off one `nft monitor` stream that timestamps every kernel change as it is read:
from the fault's first change (for a dockerd restart: Docker's own MASQUERADE reappearing) to the
end of portguard's repair (its MASQUERADE, or the jump to PORTGUARD, back in place).

    .venv/bin/python bench/daemon_bench.py [--reps 20] [--backends nftables,iptables-nft] [--idle 60] [--burst 200]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daemonproc import PortguardDaemon
from dockerhost import DockerEngine
from netns import Netns, wait_for

DOCKER_RULE = re.compile(r"^(add|insert) rule ip nat POSTROUTING .*masquerade")


class Monitor:
    """`nft monitor` in the namespace; every line stamped with the time it was read."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.lines: list[tuple[float, str]] = []
        self.restarts = 0
        self.wall_offset = time.time() - time.perf_counter()
        self._stop = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.3)

    def _read(self) -> None:
        while not self._stop:
            # line-buffered: a pipe would otherwise hold lines back in 4 KiB blocks and skew the times
            self._proc = subprocess.Popen(self.ns.argv(["stdbuf", "-oL", "nft", "monitor"]), stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL)
            assert self._proc.stdout is not None
            with self._proc.stdout:
                for raw in self._proc.stdout:
                    self.lines.append((time.perf_counter(), raw.decode(errors="replace").strip()))
            self._proc.wait()
            self.restarts += 1  # nft monitor exits on a netlink overrun (a burst of changes): resubscribe

    def close(self) -> None:
        self._stop = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(5)
        self._thread.join(5)

    def first(self, start: int, pattern: re.Pattern[str] | None = None, after: float = 0.0,
              timeout: float = 5.0) -> tuple[int, float] | None:
        deadline = time.perf_counter() + timeout
        i = start
        while time.perf_counter() < deadline:
            while i < len(self.lines):
                t, line = self.lines[i]
                if t >= after and (pattern is None or pattern.search(line)):
                    return i, t
                i += 1
            time.sleep(0.001)
        return None


def foreign(n: int) -> str:
    lines = ["*nat", ":FOREIGN - [0:0]"]
    lines += [f"-A FOREIGN -s 10.{i // 65536}.{(i // 256) % 256}.{i % 256}/32 -j RETURN" for i in range(n)]
    return "\n".join([*lines, "COMMIT", ""])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def repairs_after(daemon: PortguardDaemon, wall: float) -> list[float]:
    """Wall-clock times of the daemon's rule.repaired events at or after ``wall`` (logged after the verify)."""
    times = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
             for e in daemon.named("rule.repaired")]
    return [t for t in times if t >= wall]


def measure(mon: Monitor, daemon: PortguardDaemon, fault: Callable[[], None], effect: re.Pattern[str] | None,
            reps: int, settle: Callable[[], None]) -> tuple[list[float], list[float], int]:
    """Latencies in ms for the reps that needed a repair: from the fault's first change in the kernel, and
    from the moment the fault's own command returned (the faulting transaction is complete; no repair can
    land earlier); and how many faults needed no repair.

    The fault's first change is read off `nft monitor` (the first line is never late); the repair's time
    is portguard's own rule.repaired log event, written after its verify: monitor lines are late after a
    burst of 50,000 changes, the log is not.
    """
    out: list[float] = []
    out_after: list[float] = []
    untouched = 0
    for _ in range(reps):
        settle()
        mark = len(mon.lines)
        w0, t0 = time.time(), time.perf_counter()
        fault()
        w1 = time.time()
        first = mon.first(mark, effect, after=t0, timeout=10)
        assert first is not None, ("the fault left no trace in nft monitor", mon.restarts, mon.lines[-5:])
        first_wall = w0 + (first[1] - t0)
        start = first_wall if effect is not None else w0
        if not wait_for(lambda start=start: bool(repairs_after(daemon, start)), 2.0):
            untouched += 1
            continue
        repaired = repairs_after(daemon, start)[0]
        out.append(max(0.0, (repaired - first_wall) * 1000))
        if effect is None:
            out_after.append(max(0.0, (repaired - w1) * 1000))
    return out, out_after, untouched


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_backend(backend: str, reps: int, idle: float, burst: int, sizes: list[int], only: set[str]) -> None:
    ns = Netns("pgbench")
    engine = DockerEngine(ns)
    work = Path(tempfile.mkdtemp(prefix="pgbench-"))
    daemon = None
    mon: Monitor | None = None
    try:
        engine.start()
        saved = ns.run(["iptables-nft-save"]).stdout  # a ruleset saved before portguard started
        # The bench repeats faults faster than any real fight; keep portguard's storm brake (which
        # slows repairs to one a second) out of the latency figures.
        env = {"DOCKER_HOST": engine.host, "PORTGUARD_LOG_LEVEL": "info", "PORTGUARD_DAEMON_STORM_REPAIRS": "1000000"}
        daemon = PortguardDaemon(ns, work, "--backend", backend, env=env)
        assert daemon.wait_note("READY=1")
        pid = daemon.proc.pid  # `ip netns exec` execs: this is portguard itself
        mon = Monitor(ns)

        def healthy() -> None:
            assert wait_for(lambda: ns.portguard("check", "--backend", backend).returncode == 0, 10)

        for n in sizes:
            ns.run(["iptables-nft", "-t", "nat", "-F", "FOREIGN"], check=False)
            if n:
                ns.run(["iptables-nft-restore", "--noflush"], input=foreign(n), timeout=600)

            def refill(n: int = n) -> None:
                if n and "-A FOREIGN" not in ns.run(["iptables-nft", "-t", "nat", "-S", "FOREIGN"], check=False).stdout:
                    ns.run(["iptables-nft-restore", "--noflush"], input=foreign(n), timeout=600)
                healthy()

            def delete_rule() -> None:
                if backend == "nftables":
                    ns.nft("delete", "table", "inet", "portguard")
                else:
                    ns.run(["iptables-nft", "-t", "nat", "-F", "PORTGUARD"])

            faults: dict[str, tuple[Callable[[], None], re.Pattern[str] | None]] = {}
            if n == sizes[0]:
                counter = iter(range(10_000))

                def net_create(counter: Iterator[int] = counter) -> None:
                    i = next(counter)
                    engine.docker("network", "create", "--subnet", f"10.{100 + i // 256}.{i % 256}.0/24", f"b{i}")

                def dockerd_restart() -> None:
                    engine.stop(signal.SIGTERM)
                    engine.start()

                faults["docker network create"] = (net_create, DOCKER_RULE)
                faults["dockerd restart"] = (dockerd_restart, DOCKER_RULE)
            faults["rule delete"] = (delete_rule, None)
            faults["nat flush"] = (lambda: ns.run(["iptables-nft", "-t", "nat", "-F"]) and None, None)
            faults["ruleset restore"] = (lambda: ns.run(["iptables-nft-restore"], input=saved) and None, None)
            faults["nft flush ruleset"] = (lambda: ns.nft("flush", "ruleset") and None, None)
            for name, (fault, effect) in faults.items():
                if only and name not in only:
                    continue
                lat, lat_after, untouched = measure(mon, daemon, fault, effect, reps, refill)
                if lat:
                    tail = ""
                    if lat_after:
                        tail = (f"  | after the fault command returned: p50 {statistics.median(lat_after):6.2f} "
                                f"p99 {pct(lat_after, 0.99):6.2f} ms")
                    print(f"{backend:<13} {n:>6} {name:<22} p50 {statistics.median(lat):7.2f} ms  "
                          f"p99 {pct(lat, 0.99):7.2f} ms  max {max(lat):7.2f} ms  (n={len(lat)}){tail}", flush=True)
                else:
                    print(f"{backend:<13} {n:>6} {name:<22} not affected: rule stayed healthy in {untouched} of "
                          f"{reps} faults", flush=True)
            engine.stop(signal.SIGTERM)  # rebuild Docker's own chains after the flushes
            engine.start()
            healthy()
        ns.run(["iptables-nft", "-t", "nat", "-F", "FOREIGN"], check=False)
        if idle:
            time.sleep(2)
            c0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(idle)
            c1, t1 = cpu_seconds(pid), time.monotonic()
            print(f"{backend:<13} idle {idle:.0f}s with dockerd: CPU {100 * (c1 - c0) / (t1 - t0):.3f} % of one core, "
                  f"RSS {rss_mb(pid):.1f} MB", flush=True)
        if burst:
            mark = len(mon.lines)
            c0 = cpu_seconds(pid)
            t0 = time.perf_counter()
            for i in range(burst):
                engine.docker("network", "create", "--subnet", f"10.{200 + i // 256}.{i % 256}.0/24", f"burst{i}")
            took = time.perf_counter() - t0
            healthy()
            c1 = cpu_seconds(pid)
            # each Docker MASQUERADE insert, and the first repair after it (if it needed one)
            inserts = [t + mon.wall_offset for t, line in mon.lines[mark:] if DOCKER_RULE.search(line)]
            repairs = repairs_after(daemon, inserts[0]) if inserts else []
            gaps = [min(r for r in repairs if r >= t) - t for t in inserts if any(r >= t for r in repairs)]
            worst = f"worst repair latency {max(gaps) * 1000:.1f} ms over {len(gaps)} repairs" if gaps else \
                "no repair needed"
            print(f"{backend:<13} burst of {burst} network creates in {took:.1f}s: portguard CPU {c1 - c0:.2f}s, "
                  f"{worst}, RSS {rss_mb(pid):.1f} MB", flush=True)
    finally:
        if mon is not None:
            mon.close()
        if daemon is not None:
            daemon.close()
        engine.close()
        ns.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backends", default="nftables,iptables-nft")
    ap.add_argument("--sizes", default="10,50000")
    ap.add_argument("--idle", type=float, default=60)
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--faults", default="", help="comma-separated subset, e.g. 'nft flush ruleset'")
    args = ap.parse_args()
    for backend in args.backends.split(","):
        only = {f.strip() for f in args.faults.split(",") if f.strip()}
        run_backend(backend, args.reps, args.idle, args.burst, [int(s) for s in args.sizes.split(",")], only)


if __name__ == "__main__":
    main()
