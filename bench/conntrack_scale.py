"""Conntrack at scale: how fast stuck connections are healed, how long the effect audit reads, and what either
costs in memory, with real entries in a test namespace and with a synthetic dump of a million.

* heal: N real connections stuck in SYN_SENT with untranslated low source ports (non-blocking connects to a
  namespace that drops every SYN), then `portguard run` started: seconds from its start until none is left
  stuck; and one heal pass of the effect child alone (entries per second, peak RSS);
* audit: the effect child's audit over 100,000 real entries (UDP datagrams to many ports) and portguard run's
  peak RSS with the audit every second; and the ctnetlink parser and audit filter over a synthetic dump of
  1,000,000 entries (the host's nf_conntrack_max, 262,144, is global and not raised from a namespace).

    .venv/bin/python bench/conntrack_scale.py [--stuck 20000,100000] [--real 100000] [--synthetic 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
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

from portguard import ctnetlink
from portguard.rules import PortRange

SOURCE, TARGET = PortRange(32768, 61000), PortRange(49152, 61000)
# Stuck connections: non-blocking connects from low source ports (32768-40000 in the namespace) to as many
# destination ports as it takes (each gives its own 7,233 source ports), held open until killed.  A process
# holds at most 15,000 (this machine's hard limit on open files is 20,000): several processes for more.
STUCK = """
import socket, sys, time
first, n = int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(first, first + n):
    s = socket.socket(); s.setblocking(False)
    try: s.connect((sys.argv[1], 20000 + i // 7000))
    except BlockingIOError: pass
    socks.append(s)
print("sent", flush=True); time.sleep(3600)
"""
PER_PROCESS = 15_000
MAKE_UDP = """
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n // 65534 + 1)]
for i in range(n):
    socks[i // 65534].sendto(b"x", (host, i % 65534 + 1))
"""
JOB = {"families": ["ipv4"], "protocols": ["tcp", "udp"], "source": [SOURCE.low, SOURCE.high],
       "target": [TARGET.low, TARGET.high], "interfaces": [], "excluded": ["lo", "docker0", "br-+"]}
COUNT_STUCK = """
from portguard.conntrack import iter_flows, stuck
from portguard.rules import Family, PortRange, Protocol
print(sum(1 for _ in iter_flows([Family.IPV4], [Protocol.TCP], state="SYN_SENT",
                                keep=lambda f: stuck(f, PortRange(32768, 61000), PortRange(49152, 61000)))))
"""


def child(ns: Netns, kind: str) -> tuple[float, float, dict[str, object]]:
    """(seconds, peak RSS MB of the child, its answer) for one heal or audit, as the daemon runs it."""
    code = ("import json, resource, subprocess, sys, time\nt = time.time()\n"
            "p = subprocess.run([sys.executable, '-P', '-m', 'portguard.effects'], input=sys.argv[1], "
            "capture_output=True, text=True)\nprint(json.dumps([time.time() - t, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, json.loads(p.stdout)]))")
    out = ns.run([sys.executable, "-c", code, json.dumps({**JOB, "kind": kind})], timeout=600).stdout
    seconds, rss, answer = json.loads(out)
    return round(seconds, 2), round(rss, 1), answer


def make_stuck(ns: Netns, n: int) -> list[subprocess.Popen[str]]:
    holders = []
    for first in range(0, n, PER_PROCESS):
        holder: subprocess.Popen[str] = ns.popen(  # type: ignore[call-overload]
            [sys.executable, "-c", STUCK, SERVER_IP, str(first), str(min(PER_PROCESS, n - first))],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "sent\n"
        holders.append(holder)
    time.sleep(1)
    return holders


def release(holders: list[subprocess.Popen[str]]) -> None:
    for holder in holders:
        holder.kill()
        holder.wait()


def stuck_now(ns: Netns) -> int:
    return int(ns.run([sys.executable, "-c", COUNT_STUCK], timeout=120).stdout)


def heal_at_start(n: int) -> None:
    """N stuck connections, then `portguard run`: seconds until none is stuck; then one heal pass alone."""
    with tempfile.TemporaryDirectory() as tmp:
        ns = Netns("pgheal")
        acl = AclNetwork(ns, action="DROP")
        try:
            keep_conntrack_on(ns)
            acl.far.run(["iptables-nft", "-A", "INPUT", "-p", "tcp", "-j", "DROP"])  # every SYN unanswered
            holders = make_stuck(ns, n)
            print(f"{n} connections: {stuck_now(ns)} stuck untranslated in SYN_SENT")
            start = time.monotonic()
            d = PortguardDaemon(ns, Path(tmp), env={"DOCKER_HOST": "unix:///nonexistent",
                                                    "PORTGUARD_LOG_LEVEL": "info"})
            try:
                while (left := stuck_now(ns)) and time.monotonic() - start < 120:
                    time.sleep(0.1)
                gone = time.monotonic() - start
                healed = [e for e in d.events() if e.get("event") == "conntrack.healed"]
                print(f"  portguard run started next to them: none stuck {gone:.2f} s after its start ({left} left); "
                      f"healed {sum(int(e['entries']) for e in healed)} via {healed[0]['via'] if healed else '-'}")
            finally:
                d.close()
            release(holders)
            # One pass of the child alone, over N fresh stuck entries (no rules now: they stay stuck until healed).
            ns.run(["nft", "delete", "table", "inet", "portguard"], check=False)
            ns.run(["nft", "delete", "table", "inet", "portguard_standby"], check=False)
            ns.run(["conntrack", "-F"], check=False)
            holders = make_stuck(ns, n)
            seconds, rss, answer = child(ns, "heal")
            print(f"  one heal pass alone: {answer['healed']} entries in {seconds} s "
                  f"({int(answer['healed']) / seconds:,.0f} per second), child peak RSS {rss} MB, via {answer['via']}")
            release(holders)
        finally:
            acl.close()
            ns.close()


def daemon_peak(ns: Netns, work: Path, seconds: float = 12.0) -> float:
    cfg = work / "pg.toml"
    cfg.write_text('protocols = ["tcp", "udp"]\n[daemon]\naudit_interval = 1\n')
    d = PortguardDaemon(ns, work, "--config", str(cfg), env={"DOCKER_HOST": "unix:///nonexistent"})
    try:
        assert d.wait_note("READY=1"), d.log_path.read_text()
        time.sleep(seconds)
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")) / 1024
    finally:
        d.close()


def audit_real(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ns = Netns("pgscale")
        acl = AclNetwork(ns)
        try:
            keep_conntrack_on(ns)
            acl.far.run(["iptables-nft", "-A", "INPUT", "-p", "udp", "-j", "DROP"])
            ns.run([sys.executable, "-c", MAKE_UDP, SERVER_IP, str(n)], timeout=120)
            print(f"real table: {ns.run(['conntrack', '-C']).stdout.strip()} entries")
            seconds, rss, answer = child(ns, "audit")
            print(f"  audit: {seconds} s, child peak RSS {rss} MB, {answer['entries']} entries read via "
                  f"{answer['via']}")
            print(f"  portguard run peak RSS with the audit every second: {daemon_peak(ns, Path(tmp)):.1f} MB")
        finally:
            acl.close()
            ns.close()


def audit_synthetic(n: int) -> None:
    """The ctnetlink parser and the audit's filter over a dump of n entries, 1 MB chunks as a socket delivers."""
    entries = [ctnetlink.Entry(socket.AF_INET, "udp", "", True, "198.51.100.1", f"198.51.100.{2 + i % 200}",
                               32768 + i % 8000, i % 65534 + 1, 32768 + i % 8000, i, 0, 17) for i in range(1000)]
    block = b"".join(ctnetlink.entry_message(e) for e in entries)
    chunk = block * (len(block) and (1 << 20) // len(block))
    per_chunk = len(entries) * (len(chunk) // len(block))
    stats, found = ctnetlink.DumpStats(), 0
    start = time.process_time()
    for _ in range(-(-n // per_chunk)):
        parsed, _ = ctnetlink.parse_entries(chunk, stats)
        # the audit's test (conntrack.is_untranslated), on the parsed entries
        found += sum(1 for e in parsed if e.sport in SOURCE and e.reply_dport == e.sport and e.sport not in TARGET)
    seconds = time.process_time() - start
    print(f"synthetic dump: {stats.entries:,} entries parsed and audited in {seconds:.1f} s of CPU "
          f"({stats.entries / seconds:,.0f} per second), {found:,} untranslated, "
          f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stuck", default="20000,100000")
    parser.add_argument("--real", type=int, default=100_000)
    parser.add_argument("--synthetic", type=int, default=1_000_000)
    args = parser.parse_args()
    for n in (int(x) for x in args.stuck.split(",") if x):
        heal_at_start(n)
    if args.real:
        audit_real(args.real)
    if args.synthetic:
        audit_synthetic(args.synthetic)


if __name__ == "__main__":
    main()
