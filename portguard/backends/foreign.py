"""Other programs' source NAT, read-only: kube-proxy's masquerade mark, and masquerades nobody told portguard about.

Two questions are asked of netfilter here, never to change anything:

* Which firewall mark does kube-proxy masquerade by?  It prepends ``KUBE-POSTROUTING`` to nat ``POSTROUTING``
  (``-m mark ! --mark 0x4000/0x4000 -j RETURN``, clear the mark, ``MASQUERADE --random-fully``); its nftables
  proxier does the same in ``table ip kube-proxy`` (chain ``masquerading``: ``meta mark & 0x4000 == 0 return``).
  iptables-nft 1.8.9 stores the mark match natively, so both read the same in libnftables JSON:
  ``{"match": {"left": {"&": [{"meta": {"key": "mark"}}, MASK]}, ...}}``.
* Which masquerade or SNAT rules translate traffic from a source that no inventory covers (a libvirt network, an
  unknown runtime)?  Their traffic keeps its port; ``doctor`` names each with the configuration that covers it.

Costs: the few chains asked about by name, never the whole ruleset (50,000 foreign rules stay cheap), except for
``doctor``'s survey of masquerades, which is a one-shot command.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from portguard.backends.xtables import legacy_nat_registered
from portguard.errors import FatalError
from portguard.rules import Family, parse_mark

__all__ = ["ForeignNat", "foreign_nat", "kube_proxy_marks", "marks_in_chain", "parse_save", "uncovered"]

KUBE_CHAINS = (("nat", "KUBE-POSTROUTING"), ("kube-proxy", "masquerading"))
_MARK = re.compile(r"--mark (0x[0-9a-fA-F]+(?:/0x[0-9a-fA-F]+)?)")


class _Nft:
    """One libnftables context for a handful of listings (a context costs more than a small listing)."""

    def __enter__(self) -> _Nft:
        from portguard.backends.nftables import Libnftables

        try:
            self._nft: Any = Libnftables()
        except FatalError:
            self._nft = None
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._nft is not None:
            self._nft.close()

    def json(self, cmd: str) -> list[dict[str, Any]]:
        if self._nft is None:
            return []
        rc, out, _ = self._nft.run(cmd, json_output=True)
        try:
            return list(json.loads(out or '{"nftables": []}').get("nftables", [])) if rc == 0 else []
        except ValueError:
            return []


def marks_in_chain(objects: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
    """The masks that rules of a listed chain compare the packet mark with: kube-proxy's masquerade bit."""
    found = []
    for obj in objects:
        for expr in (obj.get("rule") or {}).get("expr", []):
            left = (expr.get("match") or {}).get("left") if isinstance(expr, dict) else None
            operands = left.get("&") if isinstance(left, dict) else None
            if (isinstance(operands, list) and len(operands) == 2 and operands[0] == {"meta": {"key": "mark"}}
                    and isinstance(operands[1], int) and 0 < operands[1] <= 0xFFFFFFFF):
                found.append((operands[1], operands[1]))
    return found


def kube_proxy_marks(families: Sequence[Family] = tuple(Family)) -> tuple[tuple[int, int], ...]:
    """The marks kube-proxy masquerades by on this host (nothing when kube-proxy's rules are not there)."""
    marks: list[tuple[int, int]] = []
    with _Nft() as nft:
        # Each chain asked for by name, never the list of all chains: kube-proxy's iptables mode makes a chain per
        # service and endpoint (measured, nft 1.0.6: 20,000 of them cost 118 ms to list, the two by name 0.5 ms).
        for family in ("ip", "ip6"):
            for table, name in KUBE_CHAINS:
                marks += marks_in_chain(nft.json(f"list chain {family} {table} {name}"))
    for family in families:
        if legacy_nat_registered(family) and shutil.which(_legacy(family)):
            try:
                proc = subprocess.run([_legacy(family), "-w", "5", "-t", "nat", "-S", "KUBE-POSTROUTING"],
                                      capture_output=True, text=True, timeout=10, check=False)
            except (OSError, subprocess.SubprocessError):
                continue
            marks += [m for m in map(parse_mark, _MARK.findall(proc.stdout)) if m is not None]
    return tuple(dict.fromkeys(marks))


def _legacy(family: Family, suffix: str = "") -> str:
    return ("iptables" if family is Family.IPV4 else "ip6tables") + "-legacy" + suffix


@dataclass(frozen=True, slots=True)
class ForeignNat:
    """A rule of another program that sets a source NAT binding."""

    where: str  # "iptables-nft nat", "nft inet libvirt_network POSTROUTING", ...
    rule: str  # as that tool prints it
    source: str | None  # the source network it is limited to, its own or its chain's (None: any source)
    family: Family
    destination: str | None = None  # the destination network it is limited to (None: any)


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:
        return []


def _option(words: list[str], *names: str) -> str | None:
    """The value of a positive (not '!'-negated) option."""
    for i, word in enumerate(words[:-1]):
        if word in names and (i == 0 or words[i - 1] != "!"):
            return words[i + 1]
    return None


def parse_save(text: str, where: str, family: Family) -> list[ForeignNat]:
    """Source-translating rules of an ``iptables-save -t nat`` listing, portguard's own left out.

    A rule in a chain that is only entered for one source (``-A POSTROUTING -s 10.88.0.0/16 -j NETAVARK-1``,
    CNI's per-container chains) is limited to that source.  A chain that returns whatever is not marked
    (kube-proxy's ``-m mark ! --mark 0x4000/0x4000 -j RETURN``) masquerades by mark: known by the mark, not
    by source, and left out here.
    """
    parsed = [(line, _words(line)) for line in text.splitlines() if line.startswith("-A ")]
    parsed = [(line, words) for line, words in parsed if len(words) > 1]
    lines = [words for _, words in parsed]
    entered: dict[str, set[str | None]] = {}
    by_mark = {w[1] for w in lines if _option(w, "-j") == "RETURN" and "--mark" in w
               and w[w.index("--mark") - 1] == "!"}
    for words in lines:
        target = _option(words, "-j", "--jump", "-g", "--goto")
        if target is not None:
            entered.setdefault(target, set()).add(_cidr(_option(words, "-s", "--source")))
    out = []
    for line, words in parsed:
        if _option(words, "-j", "--jump") not in ("MASQUERADE", "SNAT") or "portguard:" in line or words[1] in by_mark:
            continue
        source = _cidr(_option(words, "-s", "--source"))
        sources = entered.get(words[1], set())
        if source is None and len(sources) == 1:
            source = next(iter(sources))
        out.append(ForeignNat(where, line, source, family, _cidr(_option(words, "-d", "--destination"))))
    return out


def _cidr(text: str | None) -> str | None:
    try:
        return str(ipaddress.ip_network(text, strict=False)) if text else None
    except ValueError:
        return None


def _saddr(expr: list[Any]) -> str | None:
    for e in expr:
        match = e.get("match") if isinstance(e, dict) else None
        if isinstance(match, dict) and match.get("op") == "==" and isinstance(match.get("left"), dict) \
                and (match["left"].get("payload") or {}).get("field") == "saddr":
            right = match.get("right")
            prefix = right.get("prefix") if isinstance(right, dict) else None
            return _cidr(f"{prefix['addr']}/{prefix['len']}" if prefix else str(right))
    return None


def _gates_by_mark(expr: list[Any]) -> bool:
    """``meta mark & M != M return`` (iptables-nft's kube-proxy rule) or ``meta mark & M == 0 return`` (kube-proxy's
    nftables proxier): everything after it in the chain is for marked packets only."""
    if not any(isinstance(e, dict) and "return" in e for e in expr):
        return False
    for e in expr:
        match: dict[str, Any] = (e.get("match") if isinstance(e, dict) else None) or {}
        left = match.get("left")
        if isinstance(left, dict) and isinstance(left.get("&"), list) and left["&"][:1] == [{"meta": {"key": "mark"}}]:
            return bool(match.get("op") == "!=" or match.get("right") == 0)
    return False


def _nft_foreign(family: Family) -> list[ForeignNat]:
    """masquerade/snat rules of native nft tables (not iptables-nft's, not portguard's) that hook nat postrouting."""
    fam = {Family.IPV4: ("ip", "inet"), Family.IPV6: ("ip6", "inet")}[family]
    with _Nft() as nft:
        chains = [o["chain"] for o in nft.json("list chains") if "chain" in o]
        tables = {(c["family"], c["table"]) for c in chains
                  if c.get("type") == "nat" and c.get("hook") == "postrouting" and c.get("family") in fam
                  and c.get("table") not in ("nat", "portguard", "portguard_standby")}
        listed = {t: [o["rule"] for o in nft.json(f"list table {t[0]} {t[1]}") if isinstance(o.get("rule"), dict)]
                  for t in sorted(tables)}
    out = []
    for (nft_family, table), rules in listed.items():
        entered: dict[str, set[str | None]] = {}
        for rule in rules:
            for e in rule.get("expr", []):
                verdict = (e.get("jump") or e.get("goto")) if isinstance(e, dict) else None
                if isinstance(verdict, dict) and "target" in verdict:
                    entered.setdefault(verdict["target"], set()).add(_saddr(rule["expr"]))
        by_mark = {str(r.get("chain")) for r in rules if _gates_by_mark(r.get("expr", []))}
        for rule in rules:
            expr = rule.get("expr", [])
            translating = any(isinstance(e, dict) and ("masquerade" in e or "snat" in e) for e in expr)
            if not translating or str(rule.get("chain")) in by_mark:
                continue
            source = _saddr(expr)
            sources = entered.get(str(rule.get("chain")), set())
            if source is None and len(sources) == 1:
                source = next(iter(sources))
            out.append(ForeignNat(f"nft {nft_family} {table} {rule.get('chain')}", f"handle {rule.get('handle')}",
                                  source, family))
    return out


def foreign_nat(families: Sequence[Family]) -> list[ForeignNat]:
    """Every source-translating rule of another program (one-shot: reads whole nat tables)."""
    out: list[ForeignNat] = []
    for family in families:
        tools = [("iptables-nft" if family is Family.IPV4 else "ip6tables-nft") + "-save"]
        if legacy_nat_registered(family):
            tools.append(_legacy(family, "-save"))
        for tool in tools:
            if not shutil.which(tool):
                continue
            try:
                proc = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True, timeout=60, check=False)
            except (OSError, subprocess.SubprocessError):
                continue
            out += parse_save(proc.stdout, tool.removesuffix("-save") + " nat", family)
        out += _nft_foreign(family)
    return out


def uncovered(rules: Sequence[ForeignNat], covered: Sequence[str]) -> list[ForeignNat]:
    """The rules whose traffic no inventory network covers: limited to no source, or to one outside them all."""
    nets = [ipaddress.ip_network(c) for c in covered]

    def inside(cidr: str | None) -> bool:
        if cidr is None:
            return False
        net = ipaddress.ip_network(cidr)
        return any(net.version == n.version and net.subnet_of(n) for n in nets)  # type: ignore[arg-type]

    # A rule into a known network from anywhere else (flannel's `! -s CLUSTER -d CLUSTER`) stays inside the
    # networks portguard knows; reported are rules from an unknown source to anywhere.
    return [r for r in rules if not inside(r.source) and not (r.source is None and inside(r.destination))]
