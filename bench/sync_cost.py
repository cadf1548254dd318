"""Cost of `check` (observe) and `apply` (repair after a fault) per backend, at 10 and 50,000 foreign
nat rules, in a throwaway network namespace.  Prints a table of medians and p99s in milliseconds.

    .venv/bin/python bench/sync_cost.py [--reps 30] [--sizes 10,50000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BACKENDS = ("nftables", "iptables-nft", "iptables-legacy")


def _foreign(n: int, flavour: str) -> str:
    """n foreign rules in a nat chain of their own, plus a few in POSTROUTING, as iptables-restore input."""
    lines = ["*nat", ":FOREIGN - [0:0]"]
    lines += [f"-A FOREIGN -s 10.{i // 65536}.{(i // 256) % 256}.{i % 256}/32 -j RETURN" for i in range(max(n - 5, 0))]
    lines += [f"-A POSTROUTING -s 10.200.{i}.0/24 -o eth9 -j MASQUERADE" for i in range(min(n, 5))]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def inner(backend_name: str, reps: int) -> dict[str, float]:
    """Runs inside the namespace: time observe() and a repair sync() in-process."""
    from portguard.backends import make_backend
    from portguard.config import Config
    from portguard.desired import desired_rules
    from portguard.logs import configure_logging
    from portguard.reconciler import Reconciler

    log = configure_logging("json", "error")
    backend = make_backend(backend_name)
    families = [f for f in Config().families if f in backend.families()]
    rec = Reconciler(backend, desired_rules(Config(), families=families), log)
    rec.sync()
    observe, repair = [], []
    for _ in range(reps):
        t = time.perf_counter()
        assert rec.observe().healthy
        observe.append((time.perf_counter() - t) * 1000)
    for _ in range(reps):
        backend.remove()
        t = time.perf_counter()
        report = rec.sync()
        repair.append((time.perf_counter() - t) * 1000)
        assert report.after.healthy
    return {
        "check_p50": statistics.median(observe),
        "check_p99": _p(observe, 0.99),
        "apply_p50": statistics.median(repair),
        "apply_p99": _p(repair, 0.99),
    }


def outer(reps: int, sizes: list[int]) -> None:
    from netns import Netns

    print(
        f"{'backend':<16} {'foreign':>8} {'check p50':>10} {'check p99':>10} {'apply p50':>10} {'apply p99':>10}"
        f" {'CLI check':>10}"
    )
    for backend in BACKENDS:
        for n in sizes:
            ns = Netns("pgbench")
            try:
                flavour = "legacy" if backend == "iptables-legacy" else "nft"
                ns.run([f"iptables-{flavour}-restore", "--noflush"], input=_foreign(n, flavour), timeout=600)
                proc = ns.run([sys.executable, __file__, "--inner", backend, "--reps", str(reps)], timeout=1200)
                r = json.loads(proc.stdout)
                t = time.perf_counter()
                cli = ns.portguard("check", "--backend", backend)
                cli_ms = (time.perf_counter() - t) * 1000
                assert cli.returncode == 0, cli.stdout + cli.stderr
                print(
                    f"{backend:<16} {n:>8} {r['check_p50']:>10.2f} {r['check_p99']:>10.2f} "
                    f"{r['apply_p50']:>10.2f} {r['apply_p99']:>10.2f} {cli_ms:>10.1f}",
                    flush=True,
                )
            finally:
                ns.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inner")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sizes", default="10,50000")
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(inner(args.inner, args.reps)))
    else:
        outer(args.reps, [int(s) for s in args.sizes.split(",")])


if __name__ == "__main__":
    main()
