"""Backend-specific faults and views, so each test reads as the behaviour it checks."""

from __future__ import annotations

import json
import re

from netns import Netns

BACKENDS = ["nftables", "iptables-nft", "iptables-legacy"]
# The default config, per family: lo, docker0, br-+ excluded and the host rule in the early chain; the same
# exclusions and the forwarded rule in the late chain.
NFT_RULES = 16  # both families in table inet portguard's two chains (and again in the standby)
XT_V4_LINES = 10  # iptables-save of ip nat: two jumps, four rules in PORTGUARD and four in PORTGUARD-LATE
HOST_RULE = "ipv4/tcp/host"
IPTABLES_BACKENDS = ["iptables-nft", "iptables-legacy"]
JUMP = re.compile(r"-j PORTGUARD(?![-\w])")  # the early jump, not PORTGUARD-LATE


def xt(backend: str) -> str:
    """The iptables binary of the flavour a backend writes (iptables-nft for nftables' neighbours)."""
    return "iptables-legacy" if backend == "iptables-legacy" else "iptables-nft"


def check(ns: Netns, backend: str, *extra: str) -> tuple[int, dict[str, object]]:
    proc = ns.portguard("check", "--json", "--backend", backend, *extra)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def states(report: dict[str, object], family: str = "", chain: str = "") -> set[str]:
    """States of the report's rules (of one family, e.g. "ipv4", and one chain, "early" or "late", when given)."""
    return {r["state"] for r in report["rules"]  # type: ignore[union-attr]
            if r["rule"].startswith(family) and r["chain"].startswith(chain)}  # type: ignore[index]


def apply(ns: Netns, backend: str, *extra: str, expect: int = 0) -> None:
    """apply; 0 healthy, 1 when something portguard must not touch (a forced foreign flavour) remains."""
    proc = ns.portguard("apply", "--backend", backend, *extra)
    assert proc.returncode == expect, proc.stdout + proc.stderr


def owned_lines(ns: Netns, backend: str, table: str = "portguard") -> list[str]:
    """Every object portguard owns, as text: nft rules of its table, or marked/PORTGUARD lines."""
    if backend == "nftables":
        out = ns.nft("-j", "list", "table", "inet", table, check=False)
        if not out.strip():
            return []
        doc = json.loads(out)["nftables"]
        return [o["rule"].get("comment", "") for o in doc if "rule" in o]
    return [ln for ln in ns.rules(f"{xt(backend)}-save") if "portguard" in ln or "PORTGUARD" in ln]


def postrouting(ns: Netns, tool: str) -> list[str]:
    return [ln for ln in ns.rules(f"{tool}-save") if ln.startswith("-A POSTROUTING")]


def delete_rule(ns: Netns, backend: str, *, check: bool = True, table: str = "portguard") -> bool:
    """Delete portguard's IPv4 host rule by hand, as an operator or a script would; True when it went."""
    if backend == "nftables":
        listing = ns.nft("-a", "list", "chain", "inet", table, "postrouting")
        handle = re.search(r"nfproto ipv4 .*fib saddr type local.*# handle (\d+)", listing)
        assert handle, listing
        proc = ns.run(["nft", "delete", "rule", "inet", table, "postrouting", "handle", handle.group(1)], check=check)
    else:
        proc = ns.run([xt(backend), "-t", "nat", "-D", "PORTGUARD", "4"], check=check)
    return proc.returncode == 0


def open_gap(ns: Netns, backend: str) -> None:
    """Take every translation away (both unowned nft tables, or the rules of both xtables chains)."""
    if backend == "nftables":
        ns.nft("delete table inet portguard; delete table inet portguard_standby")
    else:
        ns.run([xt(backend), "-t", "nat", "-F", "PORTGUARD"])
        ns.run([xt(backend), "-t", "nat", "-F", "PORTGUARD-LATE"])


DOCKER_RULE = ["-t", "nat", "-I", "POSTROUTING", "-s", "172.18.0.0/16", "!", "-o", "br-x", "-j", "MASQUERADE"]


FLAVOURS = ("iptables-nft", "iptables-legacy")


def keep_conntrack_on(ns: Netns) -> None:
    """A conntrack user besides portguard, as Docker's own MASQUERADE is on a real host: conntrack only
    tracks a namespace while some rule needs it, so deleting portguard's rule would otherwise stop
    tracking and a healing or audit test would pass (or fail) for the wrong reason (FACTS.md)."""
    ns.run(["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "!", "-o", "docker0",
            "-j", "MASQUERADE"])


def bystander_setup(ns: Netns, *, seed_copy: bool = True, flavours: tuple[str, ...] = FLAVOURS) -> None:
    """Foreign rules in nat and filter, above, below and in other chains, in every flavour.

    ``seed_copy`` adds an unmarked twin of portguard's MASQUERADE; traffic tests leave it out, as it
    would translate ports by itself.
    """
    for tool in flavours:
        ns.run([tool, "-t", "nat", "-A", "POSTROUTING", "-s", "10.9.0.0/16", "-o", "eth9", "-j", "MASQUERADE"])
        ns.run([tool, "-t", "nat", "-N", "BYSTANDER"])
        ns.run([tool, "-t", "nat", "-A", "BYSTANDER", "-p", "udp", "--dport", "53", "-j", "RETURN"])
        ns.run([tool, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "8443", "-j", "REDIRECT",
                "--to-ports", "80"])
        ns.run([tool, "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
        ns.run([tool, "-t", "filter", "-A", "FORWARD", "-s", "10.9.0.0/16", "-j", "DROP"])
        if seed_copy:
            # identical to portguard's own MASQUERADE, but without the mark: never portguard's to touch
            ns.run(
                [
                    tool,
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-p",
                    "tcp",
                    "-m",
                    "tcp",
                    "--sport",
                    "32768:61000",
                    "-j",
                    "MASQUERADE",
                    "--to-ports",
                    "49152-61000",
                ]
            )
    bystander_nft(ns)


def bystander_nft(ns: Netns) -> None:
    """A native nft table of someone else's."""
    ns.run(["nft", "add table ip bystander; add chain ip bystander out { type filter hook output priority 0; }; "
            "add rule ip bystander out tcp dport 9999 counter"])


def bystander_snapshot(ns: Netns, flavours: tuple[str, ...] = FLAVOURS) -> str:
    """All foreign rules, counters and portguard's own objects left out."""
    parts = []
    for tool in (f"{f}-save" for f in flavours):
        for table in ("nat", "filter"):
            lines = [
                re.sub(r"\[\d+:\d+\]", "", ln)
                for ln in ns.save(tool, table).splitlines()
                if not ln.startswith("#") and "portguard" not in ln and "PORTGUARD" not in ln
            ]
            parts.append(f"{tool} {table}\n" + "\n".join(lines))
    parts.append(re.sub(r"packets \d+ bytes \d+", "", ns.nft("list", "table", "ip", "bystander")))
    return "\n".join(parts)
