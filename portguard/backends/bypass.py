"""NAT bypasses: rules elsewhere that make portguard's translation never happen, which no write of
portguard's can (or may) fix.  Read-only; reported by ``check``, ``doctor`` and the daemon's audit.

NAT needs conntrack: a packet marked ``notrack`` before conntrack sees it (a chain hooked at
prerouting or output with a priority below -200, NF_IP_PRI_CONNTRACK; iptables' raw table sits at
-300) gets no conntrack entry and skips every nat chain, portguard's included.  Seen with nft 1.0.6
and iptables 1.8.9: ``nft add rule ... notrack``, ``iptables -t raw -j NOTRACK`` and ``-j CT --notrack``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import Any

from portguard.backends.xtables import legacy_table_registered
from portguard.errors import FatalError
from portguard.rules import Family

__all__ = ["find_bypasses", "notrack_rules"]

CONNTRACK_PRIORITY = -200


def _is_notrack(expr: Sequence[Any]) -> bool:
    for e in expr:
        if not isinstance(e, dict):
            continue
        if "notrack" in e:
            return True
        xt = e.get("xt")
        if isinstance(xt, dict) and xt.get("type") == "target" and xt.get("name") in ("NOTRACK", "CT"):
            return True  # iptables-nft shows '-j CT --notrack' as an xt target it cannot translate
    return False


def _before_conntrack(chain: dict[str, Any]) -> bool:
    prio = chain.get("prio")
    return chain.get("hook") in ("prerouting", "output") and isinstance(prio, int) and prio < CONNTRACK_PRIORITY


def notrack_rules(chains: Sequence[dict[str, Any]], rules: Sequence[dict[str, Any]]) -> list[str]:
    """The notrack rules among ``rules`` (libnftables JSON) that sit in chains running before conntrack."""
    early = {
        (c.get("family"), c.get("table"), c.get("name")): c.get("prio")
        for c in chains
        if _before_conntrack(c)
    }
    out = []
    for r in rules:
        key = (r.get("family"), r.get("table"), r.get("chain"))
        if key in early and _is_notrack(r.get("expr", [])):
            where = f"{key[0]} {key[1]} {key[2]} (priority {early[key]})"
            out.append(f"{where} handle {r.get('handle')}: notrack skips NAT")
    return out


def _nft_bypasses() -> list[str]:
    from portguard.backends.nftables import Libnftables

    try:
        nft = Libnftables()
    except FatalError:
        return []
    try:
        rc, out, _ = nft.run_json([{"list": {"chains": {}}}])
        if rc != 0:
            return []
        chains = [o["chain"] for o in json.loads(out or '{"nftables": []}').get("nftables", []) if "chain" in o]
        rules: list[dict[str, Any]] = []
        for c in chains:
            if not _before_conntrack(c):
                continue
            ident = {"family": c.get("family"), "table": c.get("table"), "name": c.get("name")}
            rc, listing, _ = nft.run_json([{"list": {"chain": ident}}])
            if rc == 0:
                rules += [o["rule"] for o in json.loads(listing).get("nftables", []) if "rule" in o]
        return notrack_rules(chains, rules)
    except ValueError:
        return []  # a listing that is not JSON (nft 1.0.6 garbles some fields): no finding rather than a crash
    finally:
        nft.close()


def _legacy_bypasses(families: Sequence[Family]) -> list[str]:
    out = []
    for family in families:
        if not legacy_table_registered("raw", family):
            continue  # never list (and so register) a legacy table that is not there
        tool = "iptables-legacy-save" if family is Family.IPV4 else "ip6tables-legacy-save"
        try:
            proc = subprocess.run([tool, "-t", "raw"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        for line in proc.stdout.splitlines():
            chain = line.split()[1] if line.startswith("-A ") and len(line.split()) > 1 else ""
            notrack = "-j NOTRACK" in line or ("-j CT" in line and "--notrack" in line)
            if chain in ("PREROUTING", "OUTPUT") and notrack:
                out.append(f"{tool[:-5]} raw: {line}: notrack skips NAT")
    return out


def find_bypasses(families: Sequence[Family]) -> list[str]:
    """Every notrack rule that runs before conntrack, in nf_tables (nft and iptables-nft) and legacy raw."""
    return _nft_bypasses() + _legacy_bypasses(families)
