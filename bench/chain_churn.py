"""kube-proxy's churn on a big node: what its chain and rule changes cost `portguard run`.

kube-proxy's iptables mode (through iptables-nft) keeps a chain per service and endpoint in ``table ip nat`` and,
as endpoints come and go, adds and removes chains with ``iptables-restore --noflush``.  Here: a test namespace with
--chains such chains, then --steps changes, one every --every seconds, each adding one endpoint chain with its
rules and removing the previous one.  Printed: portguard's CPU per change (its own and its children's; the idle
share of the same daemon over as long, for comparison) and the syncs the changes caused, with p50 and p99.

    .venv/bin/python bench/chain_churn.py [--chains 20000] [--steps 60] [--every 0.5] [--backend nftables]
                                          [--source DIR]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from churn import cpu_seconds, histogram, quantile
from daemonproc import PortguardDaemon, scrape
from netns import Netns


def endpoint(i: int) -> list[str]:
    addr = f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250}"
    return [f"-A KUBE-SEP-{i:06d} -s {addr}/32 -j MARK --set-xmark 0x4000/0x4000",
            f"-A KUBE-SEP-{i:06d} -p tcp -m tcp -j DNAT --to-destination {addr}:8080"]


def restore(ns: Netns, lines: list[str]) -> None:
    ns.run(["iptables-nft-restore", "--noflush"], input="\n".join(["*nat", *lines, "COMMIT", ""]), timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--backend", default="nftables")
    parser.add_argument("--source", type=Path, help="run this checkout's portguard instead")
    args = parser.parse_args()
    env = {"PORTGUARD_LOG_LEVEL": "info", **({"PYTHONPATH": str(args.source.resolve())} if args.source else {})}
    work = Path(tempfile.mkdtemp(prefix="pg-chains-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    ns = Netns("pgchains")
    daemon = None
    try:
        restore(ns, [":KUBE-POSTROUTING - [0:0]", *(f":KUBE-SEP-{i:06d} - [0:0]" for i in range(args.chains)),
                     "-A POSTROUTING -j KUBE-POSTROUTING",
                     "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
                     "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
                     "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
                     *(line for i in range(args.chains) for line in endpoint(i))])
        config = work / "pg.toml"
        config.write_text("[daemon]\naudit_interval = 3600\n")  # the minute's audit is not what the churn costs
        daemon = PortguardDaemon(ns, work, "--backend", args.backend, "--config", str(config),
                                 env={**env, "DOCKER_HOST": "unix:///nonexistent/docker.sock"})
        assert daemon.wait_note("READY=1", 60), daemon.log_path.read_text()
        time.sleep(3)
        wall0, cpu0 = time.monotonic(), cpu_seconds(daemon.proc.pid)
        count0, buckets0 = histogram(scrape(ns, "/metrics")[1])
        for step in range(args.steps):
            new, old = args.chains + step, step
            restore(ns, [f":KUBE-SEP-{new:06d} - [0:0]", *endpoint(new), f"-F KUBE-SEP-{old:06d}",
                         f"-X KUBE-SEP-{old:06d}"])
            time.sleep(args.every)
        took = time.monotonic() - wall0
        cpu1 = cpu_seconds(daemon.proc.pid)
        count1, buckets1 = histogram(scrape(ns, "/metrics")[1])
        time.sleep(took)
        cpu2 = cpu_seconds(daemon.proc.pid)
        per, idle = (cpu1 - cpu0) / args.steps * 1000, (cpu2 - cpu1) / args.steps * 1000
        version = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False).stdout.strip()
        print(f"source: {args.source or 'this checkout'}  backend: {args.backend}  {version}")
        print(f"{args.steps} endpoint changes next to {args.chains} kube-proxy chains in {took:.1f} s")
        print(f"portguard CPU: {per:.2f} ms per change ({idle:.2f} ms of it is what the same daemon spends idle in "
              f"as long: {per - idle:.2f} ms caused by the changes)")
        print(f"syncs during the changes: {count1 - count0:.0f} (p50 {quantile(0.5, buckets0, buckets1)}, "
              f"p99 {quantile(0.99, buckets0, buckets1)})")
    finally:
        if daemon is not None:
            daemon.close()
        ns.close()


if __name__ == "__main__":
    main()
