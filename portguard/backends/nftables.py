"""The nftables backend: portguard's own table, a NAT base chain that runs before srcnat.

The kernel runs NAT hooks in priority order and stops at the first binding, so a chain at
``srcnat - 10`` (90) decides before every xtables nat table (iptables-nft and legacy both
hook at 100) and before any nft chain at ``srcnat``: Docker's MASQUERADE cannot shadow it,
and ``iptables -t nat -F`` or ``iptables-restore`` never touch it.

It talks to the kernel through libnftables (the library behind the ``nft`` program) loaded
with ctypes: no binding to keep in step with the ABI, no fork per call, and the same
parser and JSON schema (libnftables-json(5)) as the command line.  A write replaces the whole
table in one nf_tables transaction; reads list only this table and the chain headers, so
their cost does not grow with the rules other tools keep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from collections.abc import Sequence
from typing import Any

from portguard.backends.base import Observation, RuleStatus, State
from portguard.errors import FatalError, RetryableError
from portguard.rules import Action, Family, Rule

__all__ = ["CHAIN", "PRIORITY", "TABLE", "Libnftables", "NftablesBackend", "render_table"]

TABLE = "portguard"
CHAIN = "postrouting"
SRCNAT = 100
PRIORITY = SRCNAT - 10

_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON in nftables/libnftables.h
_INSTALL_HINT = "install the 'nftables' package (libnftables1)"


class Libnftables:
    """A minimal ctypes binding of libnftables: run a command buffer, get output or error."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            raise FatalError(f"backend nftables: libnftables not found; {_INSTALL_HINT}") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, cmd: str, *, json_output: bool = False) -> tuple[int, str, str]:
        with self._lock:
            self._lib.nft_ctx_output_set_flags(self._ctx, _OUTPUT_JSON if json_output else 0)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, cmd.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        return rc, out, err


def _iface(name: str) -> str:
    # The config uses iptables' trailing '+'; nft spells the same wildcard '*'.
    return name[:-1] + "*" if name.endswith("+") else name


def _rule_text(rule: Rule) -> str:
    parts = [f"meta nfproto {rule.family.value}"]
    if rule.out_interface:
        parts.append(f'oifname "{_iface(rule.out_interface)}"')
    if rule.protocol:
        parts.append(f"meta l4proto {rule.protocol.value}")
        if rule.sport:
            parts.append(f"th sport {rule.sport}")
    if rule.action is Action.RETURN:
        parts.append("return")
    else:
        parts.append("counter masquerade")
        if rule.to_ports:
            parts.append(f"to :{rule.to_ports}")
    parts.append(f'comment "{rule.mark}"')
    return " ".join(parts)


def render_table(rules: Sequence[Rule]) -> str:
    body = "\n".join(f"\t\t{_rule_text(r)}" for r in rules)
    return (
        f"table inet {TABLE} {{\n"
        f"\tchain {CHAIN} {{\n"
        f"\t\ttype nat hook postrouting priority srcnat - {SRCNAT - PRIORITY}; policy accept;\n"
        + (body + "\n" if body else "")
        + "\t}\n}\n"
    )


def _families_of(nft_family: str) -> set[Family]:
    return {"ip": {Family.IPV4}, "ip6": {Family.IPV6}, "inet": {Family.IPV4, Family.IPV6}}.get(nft_family, set())


def assess(rules: Sequence[Rule], chains: list[dict[str, Any]], own_rules: list[dict[str, Any]] | None) -> Observation:
    """The decision table for nftables, from ``list chains`` and ``list table`` JSON objects."""
    own = next(
        (c for c in chains if c.get("family") == "inet" and c.get("table") == TABLE and c.get("name") == CHAIN),
        None,
    )
    hook_ok = own is not None and (own.get("type"), own.get("hook"), own.get("prio"), own.get("policy", "accept")) == (
        "nat",
        "postrouting",
        PRIORITY,
        "accept",
    )
    shadows: dict[Family, list[str]] = {f: [] for f in Family}
    for c in chains:
        if c is own or c.get("type") != "nat" or c.get("hook") != "postrouting":
            continue
        if isinstance(c.get("prio"), int) and c["prio"] <= PRIORITY:
            for fam in _families_of(str(c.get("family"))):
                shadows[fam].append(f"{c['family']} {c['table']} {c['name']} (priority {c['prio']})")
    comments = [r.get("comment") for r in (own_rules or [])]
    wanted = [r.mark for r in rules]
    statuses = []
    present = list(dict.fromkeys(c for c in comments if c in wanted))
    for rule in rules:
        count = comments.count(rule.mark)
        if own_rules is None or count == 0:
            statuses.append(RuleStatus(rule, State.ABSENT, f"not in table inet {TABLE}"))
        elif not hook_ok:
            statuses.append(RuleStatus(rule, State.ABSENT, f"chain {CHAIN} is not a nat hook at priority {PRIORITY}"))
        elif count > 1:
            statuses.append(RuleStatus(rule, State.DUPLICATED, f"{count} copies"))
        elif shadows[rule.family]:
            statuses.append(RuleStatus(rule, State.SHADOWED, f"runs after {shadows[rule.family][0]}"))
        elif present != [m for m in wanted if m in present]:
            statuses.append(RuleStatus(rule, State.MISORDERED, "chain is out of order"))
        else:
            statuses.append(RuleStatus(rule, State.HEALTHY))
    stale = [f"inet {TABLE} {CHAIN}: {c or 'rule without mark'}" for c in comments if c not in wanted]
    if own_rules is not None and not rules:
        stale.append(f"table inet {TABLE}")
    shadowed_by = sorted({s for fam in {r.family for r in rules} for s in shadows[fam]})
    return Observation("nftables", tuple(statuses), tuple(stale), tuple(shadowed_by))


class NftablesBackend:
    name = "nftables"

    def __init__(self) -> None:
        self._nft: Libnftables | None = None

    def _lib(self) -> Libnftables:
        if self._nft is None:
            self._nft = Libnftables()
        return self._nft

    def _run(self, cmd: str, *, json_output: bool = False) -> str:
        rc, out, err = self._lib().run(cmd, json_output=json_output)
        if rc != 0:
            msg = " ".join(err.split()) or "failed without a message"
            if "Device or resource busy" in err or "Resource temporarily unavailable" in err or "Interrupted" in err:
                raise RetryableError(f"nftables: {msg}")
            raise FatalError(f"nftables: {msg}")
        return out

    def probe(self) -> None:
        # Not "list tables": nft 1.0.6 fills its whole cache for it (0.7 s at 50,000 rules).  Asking for
        # our own table is cheap, and "No such file or directory" still proves nf_tables answers.
        rc, _, err = self._lib().run(f"list table inet {TABLE}")
        if rc != 0 and "No such file or directory" not in err:
            raise FatalError(f"backend nftables: the kernel refused nf_tables ({' '.join(err.split())})")

    def render(self, rules: Sequence[Rule]) -> str:
        return render_table(rules)

    def _objects(self, cmd: str) -> list[dict[str, Any]]:
        doc = json.loads(self._run(cmd, json_output=True) or '{"nftables": []}')
        return list(doc.get("nftables", []))

    def observe(self, rules: Sequence[Rule]) -> Observation:
        chains = [o["chain"] for o in self._objects("list chains") if "chain" in o]
        has_table = any(c.get("family") == "inet" and c.get("table") == TABLE for c in chains)
        own_rules = None
        if has_table:
            own_rules = [o["rule"] for o in self._objects(f"list table inet {TABLE}") if "rule" in o]
        elif self._table_exists():
            own_rules = []
        return assess(rules, chains, own_rules)

    def _table_exists(self) -> bool:
        rc, _, _ = self._lib().run(f"list table inet {TABLE}")
        return rc == 0

    def ensure(self, rules: Sequence[Rule], seen: Observation | None = None) -> None:
        # add+delete+define in one buffer is one transaction: no moment without the rules.
        if not rules:
            self.remove()
            return
        self._run(f"add table inet {TABLE}\ndelete table inet {TABLE}\n" + render_table(rules))

    def remove(self) -> int:
        if not self._table_exists():
            return 0
        self._run(f"delete table inet {TABLE}")
        return 1
