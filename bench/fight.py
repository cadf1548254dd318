"""A tight fight: another process removes what portguard keeps, in a loop, for --seconds; portguard repairs at
full speed (no storm brake).  Prints portguard's CPU, its repairs, the fighter's attempts, and whether a host
connection every 50 ms through a REJECT ACL ever failed.

nftables: the fighter can only delete the standby table (the owned table refuses it); iptables-nft and
iptables-legacy: the fighter flushes the PORTGUARD chain.

    .venv/bin/python bench/fight.py [--seconds 30] [--backends nftables,iptables-nft,iptables-legacy]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from daemonproc import PortguardDaemon
from netns import Netns
from soak import PROBE, _stat, read_lines
from topology import PORT, SERVER_IP, AclNetwork

FIGHTERS = {
    "nftables": "nft delete table inet portguard_standby",
    "iptables-nft": "iptables-nft -t nat -F PORTGUARD",
    "iptables-legacy": "iptables-legacy -w -t nat -F PORTGUARD",
}


def fight(backend: str, seconds: float) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="pg-fight-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the daemon's log goes with it
    ns = Netns("pgfight")
    acl = AclNetwork(ns)
    d = PortguardDaemon(ns, work, "--backend", backend, env={"DOCKER_HOST": "unix:///nonexistent",
                                                               "PORTGUARD_LOG_LEVEL": "info"})
    try:
        assert d.wait_note("READY=1"), d.log_path.read_text()
        before_cpu, _ = _stat(d.proc.pid)
        repairs_before = len(d.named("rule.repaired"))
        probe = ns.popen([sys.executable, "-c", PROBE, SERVER_IP, str(PORT), "0.05", str(seconds)],
                         stdout=subprocess.PIPE)
        lines = read_lines(probe)
        script = f"n=0; end=$(( $(date +%s) + {int(seconds)} )); while [ $(date +%s) -lt $end ]; do " \
                 f"{FIGHTERS[backend]} 2>/dev/null; n=$((n+1)); done; echo $n"
        start = time.monotonic()
        attempts = int(ns.run(["sh", "-c", script], timeout=seconds + 30).stdout.strip())
        took = time.monotonic() - start
        after_cpu, rss = _stat(d.proc.pid)
        probe.wait(30)
        time.sleep(0.2)
        results = list(lines)
        failed = sum(1 for ln in results if ln.endswith(" 0"))
        return {"backend": backend, "seconds": round(took, 1), "fighter_attempts": attempts,
                "repairs": len(d.named("rule.repaired")) - repairs_before, "storm_reported": bool(d.named(
                    "rule.repair_storm")), "portguard_cpu_percent": round(100 * (after_cpu - before_cpu) / took, 1),
                "rss_mb": round(rss / 1e6, 1), "probes": len([r for r in results if r]), "probes_failed": failed}
    finally:
        d.close()
        acl.close()
        ns.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--backends", default="nftables,iptables-nft,iptables-legacy")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        print(fight(backend, args.seconds), flush=True)


if __name__ == "__main__":
    main()
