"""The nftables backend: portguard's own tables, two NAT base chains, one before and one after everyone else's.

The kernel runs NAT hooks in priority order and stops at the first binding, so a chain at
``srcnat - 10`` (90) decides before every xtables nat table (iptables-nft and legacy both
hook at 100) and before any nft chain at ``srcnat``: Docker's MASQUERADE cannot shadow it,
and ``iptables -t nat -F`` or ``iptables-restore`` never touch it.  The late chain at
``srcnat + 20`` (120) runs after all of them and after firewalld's (``srcnat + 10``), so it only
sees connections nobody translated (measured: a chain after an iptables SNAT counted only the
connections that SNAT did not match; nft 1.0.6, kernel 6.x).

Two tables hold the same rules: ``inet portguard`` at priority 90 and the standby
``inet portguard_standby`` at 91.  Under ``portguard run`` the first is created with
``flags owner`` through the daemon's one libnftables context: the kernel then refuses every
other process's attempt to delete, flush or edit it (``nft flush ruleset`` leaves it in place;
measured with nft 1.0.6 on kernel 6.x) and deletes it when the daemon's socket closes.  The
standby is an ordinary table; while the owned table exists it decides first and the standby
never matches anything new (the first NAT binding wins, exclusions return the same way in
both); after a crash or ``kill -9`` it keeps every rule in force until the next start.

It talks to the kernel through libnftables (the library behind ``nft``) loaded with ctypes.
Every write is one JSON document (libnftables-json(5)) in one transaction, so no config value
is ever parsed as nft syntax; text is only rendered for ``portguard render``.  Two quirks of
nft 1.0.6 shape this module: JSON input is only recognised while the JSON *output* flag is set
(there is no input-flags call yet), and JSON listings print garbage for table flags (the
symbol table is wrong), so flags (``dormant``, ``owner``) are read from the text listing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from portguard.backends.base import Observation, RuleStatus, State, Watch
from portguard.errors import FatalError, RetryableError, UnfixableError
from portguard.rules import Action, Family, Rule

__all__ = [
    "CHAIN",
    "LATE_CHAIN",
    "PRIMARY",
    "PRIORITY",
    "STANDBY",
    "TABLE",
    "Libnftables",
    "NftablesBackend",
    "Table",
    "assess",
    "render_table",
    "rule_expr",
]

CHAIN = "postrouting"  # the early chain
LATE_CHAIN = "postrouting_late"
SRCNAT = 100
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON in nftables/libnftables.h
_INSTALL_HINT = "install the 'nftables' package (libnftables1)"


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    priority: int  # of the early chain
    late_priority: int

    def chains(self) -> tuple[tuple[str, int], ...]:
        return (CHAIN, self.priority), (LATE_CHAIN, self.late_priority)


PRIMARY = Table("portguard", SRCNAT - 10, SRCNAT + 20)
STANDBY = Table("portguard_standby", SRCNAT - 9, SRCNAT + 21)
TABLE, PRIORITY = PRIMARY.name, PRIMARY.priority


def _srcnat(priority: int) -> str:
    """A priority as ``nft list`` prints it (nft 1.0.6-1.1.x: the symbolic name within 10 of it, else the number)."""
    offset = priority - SRCNAT
    return f"srcnat {'+' if offset >= 0 else '-'} {abs(offset)}" if abs(offset) <= 10 else str(priority)


# The only text portguard ever sends that creates something: constants, no config value in them.
_OWNED_TABLE = (
    f"add table inet {TABLE}\ndelete table inet {TABLE}\nadd table inet {TABLE} {{ flags owner; }}\n"
    + "".join(f"add chain inet {TABLE} {name} {{ type nat hook postrouting priority {_srcnat(prio)}; "
              "policy accept; }\n" for name, prio in PRIMARY.chains())
)


class Libnftables:
    """A minimal ctypes binding of libnftables: one context (one netlink socket) for its lifetime."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            raise FatalError(f"backend nftables: libnftables not found; {_INSTALL_HINT}") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx: int | None = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, cmd: str, *, json_output: bool = False) -> tuple[int, str, str]:
        with self._lock:
            if self._ctx is None:
                raise FatalError("nftables: the libnftables context was closed")
            self._lib.nft_ctx_output_set_flags(self._ctx, _OUTPUT_JSON if json_output else 0)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, cmd.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        return rc, out, err

    def run_json(self, commands: list[dict[str, Any]]) -> tuple[int, str, str]:
        """One transaction from a JSON document.  json.dumps output is always valid JSON, so libnftables
        never falls back to its text parser (nft 1.0.6 does that only for input that is not JSON)."""
        return self.run(json.dumps({"nftables": commands}), json_output=True)

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


# ---- rules as libnftables JSON (what is written) and as nft text (what render shows) ----


def _iface(name: str) -> str:
    # The config uses iptables' trailing '+'; nft spells the same wildcard '*'.  Validation has
    # already refused every other character either tool would read as syntax.
    return name[:-1] + "*" if name.endswith("+") else name


def _ip(family: Family) -> str:
    return "ip" if family is Family.IPV4 else "ip6"


def _prefix(cidr: str) -> dict[str, Any]:
    addr, _, length = cidr.partition("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def _ports(low: int, high: int) -> Any:
    return low if low == high else {"range": [low, high]}


def _match(left: dict[str, Any], right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def rule_expr(rule: Rule) -> list[dict[str, Any]]:
    """The rule's statements in libnftables JSON, in the order nft prints them back."""
    expr: list[dict[str, Any]] = []
    if not rule.source and not rule.destination:
        expr.append(_match({"meta": {"key": "nfproto"}}, rule.family.value))
    if rule.out_interface:
        expr.append(_match({"meta": {"key": "oifname"}}, _iface(rule.out_interface)))
    if rule.source:
        expr.append(_match({"payload": {"protocol": _ip(rule.family), "field": "saddr"}}, _prefix(rule.source)))
    if rule.destination:
        expr.append(_match({"payload": {"protocol": _ip(rule.family), "field": "daddr"}}, _prefix(rule.destination)))
    if rule.protocol:
        expr.append(_match({"meta": {"key": "l4proto"}}, rule.protocol.value))
        if rule.sport:
            sport = _ports(rule.sport.low, rule.sport.high)
            expr.append(_match({"payload": {"protocol": "th", "field": "sport"}}, sport))
    if rule.local_source:
        expr.append(_match({"fib": {"result": "type", "flags": ["saddr"]}}, "local"))
    if rule.fwmark:
        expr.append(_match({"&": [{"meta": {"key": "mark"}}, rule.fwmark[1]]}, rule.fwmark[0]))
    if rule.action is Action.RETURN:
        expr.append({"return": None})
        return expr
    expr.append({"counter": None})
    expr.append({rule.action.value: _nat_statement(rule)})
    return expr


def _nat_statement(rule: Rule) -> dict[str, Any]:
    nat: dict[str, Any] = {}
    if rule.action is Action.SNAT:
        nat["family"] = _ip(rule.family)
        if rule.to_address:
            nat["addr"] = rule.to_address
    if rule.to_ports:
        nat["port"] = _ports(rule.to_ports.low, rule.to_ports.high)
    if rule.fully_random:
        nat["flags"] = ["fully-random"]
    return nat


def _text_ports(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def rule_text(rule: Rule) -> str:
    """The rule as ``nft list table`` prints it (counters zero)."""
    parts: list[str] = []
    if not rule.source and not rule.destination:
        parts.append(f"meta nfproto {rule.family.value}")
    if rule.out_interface:
        parts.append(f'oifname "{_iface(rule.out_interface)}"')
    if rule.source:
        parts.append(f"{_ip(rule.family)} saddr {rule.source}")
    if rule.destination:
        parts.append(f"{_ip(rule.family)} daddr {rule.destination}")
    if rule.protocol:
        if rule.sport:
            parts.append(f"{rule.protocol.value} sport {_text_ports(rule.sport.low, rule.sport.high)}")
        else:
            parts.append(f"meta l4proto {rule.protocol.value}")
    if rule.local_source:
        parts.append("fib saddr type local")
    if rule.fwmark:
        parts.append(f"meta mark & {rule.fwmark[1]:#010x} == {rule.fwmark[0]:#010x}")
    parts.append("return" if rule.action is Action.RETURN else _nat_text(rule))
    parts.append(f'comment "{rule.mark}"')
    return " ".join(parts)


def _nat_text(rule: Rule) -> str:
    ports = f":{_text_ports(rule.to_ports.low, rule.to_ports.high)}" if rule.to_ports else ""
    if rule.action is Action.MASQUERADE:
        text = f"masquerade to {ports}" if ports else "masquerade"
    elif rule.to_address:
        addr = rule.to_address if rule.family is Family.IPV4 else f"[{rule.to_address}]"
        text = f"snat {_ip(rule.family)} to {addr}{ports}"
    else:
        text = f"snat to {ports}"
    return "counter packets 0 bytes 0 " + text + (" fully-random" if rule.fully_random else "")


def _chain_of(rule: Rule) -> str:
    return LATE_CHAIN if rule.late else CHAIN


def render_table(rules: Sequence[Rule], table: Table = PRIMARY, *, owner: bool = False) -> str:
    flags = "\tflags owner\n\n" if owner else ""
    chains = []
    for name, prio in table.chains():
        body = "".join(f"\t\t{rule_text(r)}\n" for r in rules if _chain_of(r) == name)
        chains.append(f"\tchain {name} {{\n\t\ttype nat hook postrouting priority {_srcnat(prio)}; policy accept;\n"
                      f"{body}\t}}\n")
    return f"table inet {table.name} {{\n{flags}" + "\n".join(chains) + "}\n"


def _table_commands(rules: Sequence[Rule], table: Table, *, recreate: bool) -> list[dict[str, Any]]:
    """Replace the table whole (recreate) or refill its chains; one transaction either way."""
    ident = {"family": "inet", "table": table.name}
    cmds: list[dict[str, Any]] = []
    if recreate:
        cmds += [
            {"add": {"table": {"family": "inet", "name": table.name}}},
            {"delete": {"table": {"family": "inet", "name": table.name}}},
            {"add": {"table": {"family": "inet", "name": table.name}}},
        ]
        cmds += [{"add": {"chain": {**ident, "name": name, "type": "nat", "hook": "postrouting", "prio": prio,
                                    "policy": "accept"}}} for name, prio in table.chains()]
    else:
        cmds += [{"flush": {"chain": {**ident, "name": name}}} for name, _ in table.chains()]
    cmds += [{"add": {"rule": {**ident, "chain": _chain_of(r), "expr": rule_expr(r), "comment": r.mark}}}
             for r in rules]
    return cmds


# ---- reading: the decision table ----


def _families_of(nft_family: str) -> set[Family]:
    return {"ip": {Family.IPV4}, "ip6": {Family.IPV6}, "inet": {Family.IPV4, Family.IPV6}}.get(nft_family, set())


@dataclass(frozen=True, slots=True)
class TableView:
    """One of portguard's tables as listed: None means absent."""

    comments: dict[str, list[str | None]] | None  # rule comments in order, per chain; None: no table
    flags: frozenset[str] = frozenset()
    program: str = ""  # '# progname' of an owned table


def _status(rule: Rule, comments: list[str | None] | None, table: Table, *,  # noqa: PLR0911  # the decision table
            flags: frozenset[str], hook_ok: bool, in_order: bool, shadows: list[str]) -> RuleStatus:
    chain, prio = (LATE_CHAIN, table.late_priority) if rule.late else (CHAIN, table.priority)
    count = (comments or []).count(rule.mark)
    if comments is None or count == 0:
        return RuleStatus(rule, State.ABSENT, f"not in table inet {table.name}")
    if not hook_ok:
        return RuleStatus(rule, State.ABSENT, f"chain {chain} is not a nat hook at priority {prio}")
    if "dormant" in flags:
        return RuleStatus(rule, State.DORMANT, f"table inet {table.name} has flags dormant")
    if count > 1:
        return RuleStatus(rule, State.DUPLICATED, f"{count} copies")
    if not in_order:
        return RuleStatus(rule, State.MISORDERED, f"chain {chain} is out of order")
    if shadows:
        # Another nat chain at a priority <= ours: not portguard's to touch; reported, never fought.
        return RuleStatus(rule, State.SHADOWED, f"runs after {shadows[0]}", fixable=False)
    return RuleStatus(rule, State.HEALTHY)


def assess(
    rules: Sequence[Rule],
    chains: list[dict[str, Any]],
    own: TableView,
    table: Table = PRIMARY,
) -> tuple[list[RuleStatus], list[str], list[str]]:
    """Per-rule states, stale objects and shadowing chains for one of portguard's tables.

    Only the early chain can be shadowed: the late chain is meant to run after everyone else.
    """
    shadows: dict[Family, list[str]] = {f: [] for f in Family}
    for c in chains:
        if str(c.get("table", "")).startswith(PRIMARY.name) and c.get("family") == "inet":
            continue  # portguard's own tables never shadow each other: they decide the same way
        if c.get("type") != "nat" or c.get("hook") != "postrouting":
            continue
        if isinstance(c.get("prio"), int) and c["prio"] <= table.priority:
            for fam in _families_of(str(c.get("family"))):
                shadows[fam].append(f"{c['family']} {c['table']} {c['name']} (priority {c['prio']})")
    found: dict[Rule, RuleStatus] = {}
    stale: list[str] = []
    for name, prio in table.chains():
        mine = next((c for c in chains if c.get("family") == "inet" and c.get("table") == table.name
                     and c.get("name") == name), None)
        shape = (mine.get("type"), mine.get("hook"), mine.get("prio"), mine.get("policy", "accept")) if mine else None
        hook_ok = shape == ("nat", "postrouting", prio, "accept")
        comments = None if own.comments is None else own.comments.get(name, [])
        wanted_rules = [r for r in rules if _chain_of(r) == name]
        wanted = [r.mark for r in wanted_rules]
        present = list(dict.fromkeys(c for c in comments or [] if c in wanted))
        in_order = present == [m for m in wanted if m in present]
        for rule in wanted_rules:
            found[rule] = _status(rule, comments, table, flags=own.flags, hook_ok=hook_ok, in_order=in_order,
                                  shadows=[] if rule.late else shadows[rule.family])
        stale += [f"inet {table.name} {name}: {c or 'rule without mark'}" for c in comments or [] if c not in wanted]
    if own.comments is not None and not rules:
        stale.append(f"table inet {table.name}")
    shadowed_by = sorted({s for fam in {r.family for r in rules if not r.late} for s in shadows[fam]})
    return [found[r] for r in rules], stale, shadowed_by


_FLAGS = re.compile(r"^\s*flags\s+([a-z, ]+)$", re.M)
_PROGNAME = re.compile(r"^table inet \S+ \{ # progname (\S+)", re.M)


class NftablesBackend:
    name = "nftables"
    watch = Watch(nf_tables=frozenset({PRIMARY.name.encode(), STANDBY.name.encode()}), poll_legacy=False)

    def __init__(self, *, owner: bool = False) -> None:
        self._nft: Libnftables | None = None
        self._owner_wanted = owner
        self._owning = False  # this context created the owned table, and it still exists
        self.owner_unsupported = ""  # why the kernel refused 'flags owner', when it did

    def _lib(self) -> Libnftables:
        if self._nft is None:
            self._nft = Libnftables()
        return self._nft

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None
            self._owning = False

    @staticmethod
    def _check(rc: int, err: str) -> None:
        if rc == 0:
            return
        msg = " ".join(err.split()) or "failed without a message"
        if "Device or resource busy" in err or "Resource temporarily unavailable" in err or "Interrupted" in err:
            raise RetryableError(f"nftables: {msg}")
        if "No such file or directory" in err:
            # Something portguard read a moment ago is gone (another process deleted it in between): the
            # ruleset changed under us; read again, never a reason to stop.
            raise RetryableError(f"nftables: changed while read: {msg}")
        if "Operation not permitted" in err:
            raise UnfixableError(f"nftables: {msg}")
        raise FatalError(f"nftables: {msg}")

    def _run(self, cmd: str, *, json_output: bool = False) -> str:
        rc, out, err = self._lib().run(cmd, json_output=json_output)
        self._check(rc, err)
        return out

    def _write(self, commands: list[dict[str, Any]]) -> None:
        rc, _, err = self._lib().run_json(commands)
        self._check(rc, err)

    def probe(self) -> None:
        # Not "list tables": nft 1.0.6 fills its whole cache for it (0.7 s at 50,000 rules).  Asking for
        # our own table is cheap, and "No such file or directory" still proves nf_tables answers.
        rc, _, err = self._lib().run(f"list table inet {TABLE}")
        if rc != 0 and "No such file or directory" not in err:
            raise FatalError(f"backend nftables: the kernel refused nf_tables ({' '.join(err.split())})")

    def families(self) -> tuple[Family, ...]:
        # The inet family carries both; a kernel without IPv6 NAT refuses the ip6 statements at write time.
        return (Family.IPV4, Family.IPV6)

    def render(self, rules: Sequence[Rule]) -> str:
        return render_table(rules, PRIMARY, owner=self._owner_wanted) + render_table(rules, STANDBY)

    def _objects(self, cmd: str) -> list[dict[str, Any]]:
        doc = json.loads(self._run(cmd, json_output=True) or '{"nftables": []}')
        return list(doc.get("nftables", []))

    def _view(self, table: Table, chains: list[dict[str, Any]]) -> TableView:
        rc, text, _ = self._lib().run(f"list table inet {table.name}")
        if rc != 0:
            return TableView(None)
        flags_line = _FLAGS.search(text.split("chain ", 1)[0])
        flags = frozenset(f.strip() for f in flags_line.group(1).split(",")) if flags_line else frozenset()
        prog = _PROGNAME.search(text)
        comments: dict[str, list[str | None]] = {}
        for name, _ in table.chains():
            if not any(c.get("table") == table.name and c.get("family") == "inet" and c.get("name") == name
                       for c in chains):
                continue
            try:
                listing = self._objects(f"list chain inet {table.name} {name}")
            except RetryableError:
                return TableView(None)  # deleted between 'list chains' and this read: absent now
            comments[name] = [o["rule"].get("comment") for o in listing if "rule" in o]
        return TableView(comments, flags, prog.group(1) if prog else "")

    def observe(self, rules: Sequence[Rule]) -> Observation:
        chains = [o["chain"] for o in self._objects("list chains") if "chain" in o]
        # Whose deletion the notification filter must not skip (one of them may be what shadows the rules now).
        self.watch = replace(self.watch, base_chains=frozenset(
            (str(c.get("table")).encode(), str(c.get("name")).encode()) for c in chains
            if "hook" in c and c.get("table") not in (PRIMARY.name, STANDBY.name)))
        primary = self._view(PRIMARY, chains)
        statuses, stale, shadowed_by = assess(rules, chains, primary, PRIMARY)
        standby_statuses, standby_stale, standby_shadows = assess(rules, chains, self._view(STANDBY, chains), STANDBY)
        standby = [f"{s.rule.name}: {s.state.value}" for s in standby_statuses if s.fixable and
                   s.state is not State.HEALTHY] + standby_stale
        if primary.comments is None and rules and not standby and not self._owner_wanted:
            # The daemon stopped (or was killed) and its owned table went with it: the standby holds every
            # rule at srcnat - 9, still before every xtables nat table and any chain at srcnat.  In force.
            statuses = [replace(s, detail=s.detail or f"in force through table inet {STANDBY.name}")
                        for s in standby_statuses]
            shadowed_by = standby_shadows
        owner = ""
        if "owner" in primary.flags:
            owner = "this process" if self._owning else f"another process ({primary.program or 'unknown'})"
        elif self._owner_wanted and not self.owner_unsupported and primary.comments is not None:
            stale.append(f"table inet {TABLE}: not owned by this daemon (replaced by an owned one)")
        note = f"table ownership unavailable, repairing instead: {self.owner_unsupported}" if (
            self.owner_unsupported) else ""
        return Observation(self.name, tuple(statuses), tuple(stale), tuple(shadowed_by),
                           standby=tuple(standby), owner=owner, note=note)

    def ensure(self, rules: Sequence[Rule], seen: Observation | None = None) -> None:
        if not rules:
            self.remove()
            return
        if seen is not None and seen.owner.startswith("another process"):
            raise UnfixableError(f"table inet {TABLE} is owned by {seen.owner}: only its owner can change it")
        # The standby first: while the primary is rebuilt below, the standby already decides.
        if seen is None or seen.standby:
            self._write(_table_commands(rules, STANDBY, recreate=True))
        primary_ok = seen is not None and not seen.stale and not any(
            s.fixable and s.state is not State.HEALTHY for s in seen.statuses)
        if primary_ok:
            return
        if self._owner_wanted and not self.owner_unsupported:
            if not self._owning:
                self._take_ownership()
            if self._owning:
                self._write(_table_commands(rules, PRIMARY, recreate=False))
                return
        self._write(_table_commands(rules, PRIMARY, recreate=True))

    def _take_ownership(self) -> None:
        """(Re)create the primary as an owned table: a fixed text command, then filled through JSON."""
        rc, _, err = self._lib().run(_OWNED_TABLE)
        if rc == 0:
            self._owning = True
            return
        if "Operation not permitted" in err:
            raise UnfixableError(f"nftables: table inet {TABLE} is owned by another process")
        # Kernels before 5.12 (and nft builds without table flags) refuse 'flags owner'.
        self.owner_unsupported = " ".join(err.split())[:200] or "refused"

    def remove(self) -> int:
        removed = 0
        for table in (PRIMARY, STANDBY):
            rc, text, _ = self._lib().run(f"list table inet {table.name}")
            if rc != 0:
                continue
            if table is PRIMARY and "flags owner" in text.split("chain ", 1)[0] and not self._owning:
                prog = _PROGNAME.search(text)
                who = prog.group(1) if prog else "a process"
                raise UnfixableError(
                    f"table inet {TABLE} is owned by a running 'portguard run' ({who}); "
                    "stop it first (systemctl stop portguard), or restart it with --cleanup-on-exit"
                )
            self._write([{"delete": {"table": {"family": "inet", "name": table.name}}}])
            removed += 1
        self._owning = False
        return removed
