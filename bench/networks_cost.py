"""The cost of a sync with many Docker networks: 200 bridge networks (100 masqueraded the default way, 50 with
host_ipv4, 50 not masqueraded), per backend, in a throwaway namespace: rules, first write, a no-op sync (what
every trigger costs when nothing changed) and a repair after one network's rule was deleted.

    .venv/bin/python bench/networks_cost.py [--networks 200] [--reps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import structlog
from netns import Netns

from portguard.config import Config
from portguard.desired import desired_rules
from portguard.inventory import Inventory, Part
from portguard.runtimes.docker import parse_networks

CODE = """
import json, statistics, sys, time
from portguard.backends import make_backend
from portguard.config import Config
from portguard.desired import desired_rules
from portguard.inventory import Inventory, Part
from portguard.runtimes.docker import parse_networks
from portguard.reconciler import Reconciler
backend_name, reps, raw = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
backend = make_backend(backend_name)
families = [f for f in Config().families if f in backend.families()]
rules = desired_rules(Config(), Inventory.of({"docker": Part(parse_networks(raw))}), families)
from portguard.logs import configure_logging
rec = Reconciler(backend, rules, configure_logging("json", "error"))
t = time.perf_counter(); rec.sync(); first = (time.perf_counter() - t) * 1000
noop = []
for _ in range(reps):
    t = time.perf_counter(); r = rec.sync(); noop.append((time.perf_counter() - t) * 1000)
    assert not r.changed
repair = []
for _ in range(reps):
    backend.remove() if backend_name == "nftables" else None
    if backend_name != "nftables":
        import subprocess
        tool = "iptables-nft" if backend_name == "iptables-nft" else "iptables-legacy"
        subprocess.run([tool, "-t", "nat", "-D", "PORTGUARD", "10"], check=True)
    t = time.perf_counter(); r = rec.sync(); repair.append((time.perf_counter() - t) * 1000)
    assert r.changed and r.after.healthy
q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
print(json.dumps({"rules": len(rules), "first_ms": round(first, 1), "noop_p50": round(statistics.median(noop), 2),
                  "noop_p99": round(q(noop, .99), 2), "repair_p50": round(statistics.median(repair), 1),
                  "repair_p99": round(q(repair, .99), 1)}))
"""


def inventory(n: int) -> list[dict[str, Any]]:
    nets = []
    for i in range(n):
        options: dict[str, str] = {}
        if i % 4 == 1:
            options["com.docker.network.host_ipv4"] = "198.51.100.32"
        elif i % 4 == 3:
            options["com.docker.network.bridge.enable_ip_masquerade"] = "false"
        nets.append({"Name": f"net{i}", "Id": f"{i:064x}", "Driver": "bridge", "Options": options,
                     "IPAM": {"Config": [{"Subnet": f"10.{100 + i // 250}.{i % 250}.0/24"}]}})
    return nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", type=int, default=200)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    import json

    raw = inventory(args.networks)
    t = time.perf_counter()
    rules = desired_rules(Config(), Inventory.of({"docker": Part(parse_networks(raw))}))
    derive = (time.perf_counter() - t) * 1000
    print(f"{args.networks} networks -> {len(rules)} rules (both families), derived in {derive:.1f} ms")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    for backend in ("nftables", "iptables-nft", "iptables-legacy"):
        ns = Netns("pgnets")
        try:
            if backend == "iptables-legacy":
                ns.run(["ip6tables-legacy", "-t", "nat", "-S", "POSTROUTING"])
            out = ns.run([sys.executable, "-c", CODE, backend, str(args.reps)], input=json.dumps(raw), timeout=600)
            print(f"{backend:<16} {out.stdout.strip()}")
        finally:
            ns.close()
    print(f"(median of {args.reps}: no-op sync = a trigger when nothing changed; repair = one rule deleted, then sync)")


if __name__ == "__main__":
    main()
