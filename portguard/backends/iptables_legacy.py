"""The iptables-legacy backend, through python-iptables (which binds legacy libiptc).

Every operation refreshes the table first (libiptc works on a snapshot), changes it in
memory and commits once; the kernel replaces the whole table atomically.  A commit racing
another writer fails with EAGAIN and is retried on a fresh snapshot.  libiptc does not take
the xtables lock, so portguard takes it itself around each commit, as ``iptables -w`` does.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from portguard.backends import xtables
from portguard.backends.base import Observation, Watch
from portguard.backends.iptables_nft import IptablesNftBackend
from portguard.errors import FatalError, RetryableError
from portguard.rules import Action, Family, Rule

__all__ = ["IptablesLegacyBackend"]

_LOCK_WAIT = 2.0
_COMMIT_ATTEMPTS = 3


def _lockfile() -> str:
    # iptables >= 1.8.6 honours XTABLES_LOCKFILE; tests point it at a private file.
    return os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")


@contextmanager
def xtables_lock(wait: float = _LOCK_WAIT) -> Iterator[None]:
    """Hold the xtables lock, or raise RetryableError after ``wait`` seconds."""
    path = _lockfile()
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise FatalError(f"cannot open the xtables lock {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RetryableError(f"xtables lock {path} is held by another process") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _match_options(m: Any) -> list[str]:
    """A libiptc match's options as ``iptables -S`` prints the ones decisions look at."""
    if m.name == "comment":
        return ["--comment", f'"{m.comment}"']
    if m.name in ("tcp", "udp") and m.sport:
        return ["--sport", m.sport]
    if m.name == "addrtype" and m.src_type:
        return ["--src-type", m.src_type]
    if m.name == "mark" and m.mark:
        return ["--mark", m.mark]
    return []


class IptablesLegacyBackend:
    name = "iptables-legacy"
    watch = Watch(nf_tables=None, poll_legacy=True)  # legacy xtables send no notifications: poll

    def __init__(self) -> None:
        self._mod: Any = None
        self._rule_types: dict[Family, Any] = {}
        # IPv6 goes through ip6tables-legacy-restore: iptables 1.8.9 ships SNAT and MASQUERADE in one library,
        # libxt_NAT.so, and libxtables registers a library's targets only for the family active when it is
        # first loaded; python-iptables 1.2.0 then cannot find them for the other family ("can't find target
        # SNAT"), and loading them again aborts ("already registered").  So python-iptables serves IPv4.
        self._ip6 = IptablesNftBackend("legacy", only=(Family.IPV6,))

    def families(self) -> tuple[Family, ...]:
        # Writing an IPv6 rule would register a legacy ip6 nat table, which reorders that family's NAT hooks
        # (the most recently registered runs first).  Only translate IPv6 where one is already in use.
        return (Family.IPV4, Family.IPV6) if xtables.legacy_nat_registered(Family.IPV6) else (Family.IPV4,)

    def close(self) -> None:
        return

    def _rule(self, family: Family) -> Any:
        """A python-iptables rule class that only ever looks at the nat table.

        python-iptables 1.2.0 decides whether a target is a chain by asking every table of the family
        (``Rule.tables``), and opening a legacy table registers it: inserting the jump would register
        filter, mangle, raw and security tables portguard never asked for.
        """
        if family not in self._rule_types:
            iptc = self._iptc()
            base, table_cls = (iptc.Rule, iptc.Table) if family is Family.IPV4 else (iptc.Rule6, iptc.Table6)

            class NatOnly(base):  # type: ignore[misc, valid-type]  # python-iptables ships no stubs
                @property
                def tables(self) -> list[Any]:
                    return [table_cls(table_cls.NAT)]

            self._rule_types[family] = NatOnly
        return self._rule_types[family]()

    def _iptc(self) -> Any:
        if self._mod is None:
            try:
                import iptc  # python-iptables ships no stubs; see mypy overrides
            except ImportError:
                raise FatalError(
                    "backend iptables-legacy: python-iptables is not installed; pip install python-iptables"
                ) from None
            except Exception as exc:  # noqa: BLE001  # the library raises XTablesError/OSError when libiptc is missing
                raise FatalError(
                    f"backend iptables-legacy: libiptc not usable ({exc}); install the 'iptables' package"
                ) from None
            # iptables 1.8.9 ships SNAT and MASQUERADE in libxt_NAT.so (libxt_SNAT.so is a link to it), and
            # libxtables registers a library's targets only for the family active when it is first loaded:
            # after an IPv4 rule, python-iptables 1.2.0 cannot find the IPv6 SNAT ("can't find target").
            # Its alias table makes the second lookup call libxt_NAT_init again, for the other family.
            aliases = iptc.xtables.xtables._real_name  # python-iptables' own alias map (state->conntrack)
            aliases.setdefault("SNAT", "NAT")
            aliases.setdefault("MASQUERADE", "NAT")
            self._mod = iptc
        return self._mod

    def probe(self) -> None:
        self._iptc()

    # ---- reading ----

    def _table(self, family: Family) -> Any:
        iptc = self._iptc()
        table = iptc.Table(iptc.Table.NAT) if family is Family.IPV4 else iptc.Table6(iptc.Table6.NAT)
        table.autocommit = False
        try:
            table.refresh()
        except iptc.IPTCError as exc:
            raise RetryableError(f"iptables-legacy: {exc}") from None
        return table

    def _read(self, table: Any) -> tuple[list[tuple[xtables.XRule, Any]], list[xtables.XRule] | None,
                                         list[xtables.XRule] | None]:
        """POSTROUTING (with the libiptc objects, to delete by), and portguard's two chains (None: absent)."""
        iptc = self._iptc()
        postrouting = [(self._xrule("POSTROUTING", r), r) for r in iptc.Chain(table, "POSTROUTING").rules]
        chains: list[list[xtables.XRule] | None] = []
        for name in (xtables.CHAIN, xtables.LATE_CHAIN):
            chains.append([self._xrule(name, r) for r in iptc.Chain(table, name).rules]
                          if table.is_chain(name) else None)
        return postrouting, chains[0], chains[1]

    @staticmethod
    def _xrule(chain: str, r: Any) -> xtables.XRule:
        """Reduce a libiptc rule to the fields decisions use, with the text ``iptables -S`` would print."""
        parts: list[str] = []
        addresses: list[str | None] = []
        for flag, value in (("-s", r.src), ("-d", r.dst)):
            negated = bool(value) and value.startswith("!")
            net = ipaddress.ip_network(value.lstrip("!"), strict=False) if value else None
            addresses.append(None)
            if net is not None and net.prefixlen:
                parts += ["!", flag, net.with_prefixlen] if negated else [flag, net.with_prefixlen]
                addresses[-1] = ("!" if negated else "") + net.with_prefixlen
        out_if = r.out_interface or None
        if out_if:
            parts += ["!", "-o", out_if[1:]] if out_if.startswith("!") else ["-o", out_if]
        proto = r.protocol if r.protocol not in (None, "ip", "ipv6", "all") else None
        if proto:
            parts += ["-p", proto]
        comment = None
        for m in r.matches:
            parts += ["-m", m.name, *_match_options(m)]
            comment = m.comment if m.name == "comment" else comment
        target = r.target.name or None if r.target else None
        if target:
            parts += ["-j", target]
            params = r.target.get_all_parameters()
            for option in ("to-ports", "to-source"):
                if params.get(option):
                    parts += [f"--{option}", params[option][0]]
            if "random-fully" in params:
                parts.append("--random-fully")
        return xtables.XRule(chain, " ".join(parts), comment, target, proto, out_if, *addresses)

    def _assess(self, family: Family, rules: Sequence[Rule]) -> Observation:
        if not xtables.legacy_nat_registered(family):
            return xtables.assess(self.name, rules, [], None)[0]
        postrouting, chain, late = self._read(self._table(family))
        return xtables.assess(self.name, rules, [x for x, _ in postrouting], chain, late)[0]

    def observe(self, rules: Sequence[Rule]) -> Observation:
        grouped = xtables.by_family(rules)
        parts = []
        if Family.IPV4 in grouped or xtables.legacy_nat_registered(Family.IPV4):
            parts.append(self._assess(Family.IPV4, grouped.get(Family.IPV4, [])))
        if xtables.legacy_nat_registered(Family.IPV6):
            parts.append(self._ip6.observe(grouped.get(Family.IPV6, [])))
        return xtables.merge(self.name, parts)

    # ---- writing ----

    def _jump(self, family: Family, *, late: bool) -> Any:
        r = self._rule(family)
        r.create_match("comment").comment = xtables.LATE_JUMP_MARK if late else xtables.JUMP_MARK
        r.create_target(xtables.LATE_CHAIN if late else xtables.CHAIN)
        return r

    def _build(self, family: Family, rule: Rule) -> Any:
        """A libiptc rule for ``rule`` (same order as rule_spec)."""
        r = self._rule(family)
        if rule.source:
            r.src = rule.source
        if rule.destination:
            r.dst = rule.destination
        if rule.out_interface:
            r.out_interface = rule.out_interface
        if rule.protocol:
            r.protocol = rule.protocol.value
            if rule.sport:
                r.create_match(rule.protocol.value).sport = f"{rule.sport.low}:{rule.sport.high}"
        if rule.local_source:
            r.create_match("addrtype").src_type = "LOCAL"
        if rule.fwmark:
            r.create_match("mark").mark = f"{rule.fwmark[0]:#x}/{rule.fwmark[1]:#x}"
        r.create_match("comment").comment = rule.mark
        if rule.action is Action.RETURN:
            r.create_target("RETURN")
            return r
        if rule.action is Action.MASQUERADE:
            target = r.create_target("MASQUERADE")
            if rule.to_ports:
                target.to_ports = str(rule.to_ports)
        else:
            target = r.create_target("SNAT")
            target.to_source = xtables.to_source(rule)
        if rule.fully_random:
            target.random_fully = ""
        return r

    def _commit_family(self, family: Family, rules: Sequence[Rule], remove: bool) -> int:
        """Under the xtables lock: refresh, plan, change in memory, commit once."""
        iptc = self._iptc()
        for attempt in range(_COMMIT_ATTEMPTS):
            with xtables_lock():
                table = self._table(family)
                changed = self._stage(iptc, family, table, rules, remove)
                if not changed:
                    return 0
                try:
                    table.commit()
                    return changed
                except iptc.IPTCError as exc:
                    # EAGAIN: another writer replaced the table after our snapshot (one that
                    # ignores the lock); take a new snapshot and plan again.
                    if "temporarily unavailable" not in str(exc) or attempt + 1 == _COMMIT_ATTEMPTS:
                        raise RetryableError(f"iptables-legacy commit: {exc}") from None
        return 0

    def _stage(self, iptc: Any, family: Family, table: Any, rules: Sequence[Rule], remove: bool) -> int:
        """Make the in-memory changes on a fresh snapshot; returns how many objects change."""
        postrouting, chain, late = self._read(table)
        listed = [x for x, _ in postrouting]
        plan = xtables.removal_plan(listed, chain, late) if remove else xtables.assess(
            self.name, rules, listed, chain, late)[1]
        if plan.empty:
            return 0
        pr_chain = iptc.Chain(table, "POSTROUTING")
        if plan.rewrite_chain:
            self._refill(table, family, xtables.CHAIN, [r for r in rules if not r.late], exists=chain is not None)
        if plan.rewrite_late_chain:
            self._refill(table, family, xtables.LATE_CHAIN, [r for r in rules if r.late], exists=late is not None)
        doomed = set(plan.delete_postrouting)
        for x, obj in postrouting:
            if xtables.is_own_jump(x) and x.spec in doomed:
                pr_chain.delete_rule(obj)
        for drop, name in ((plan.drop_chain, xtables.CHAIN), (plan.drop_late_chain, xtables.LATE_CHAIN)):
            if drop:
                table.flush_entries(name)
                table.delete_chain(name)
        if plan.insert_jump:
            pr_chain.insert_rule(self._jump(family, late=False))
        if plan.append_late_jump:
            pr_chain.append_rule(self._jump(family, late=True))
        return len(plan.delete_postrouting) + plan.drop_chain + plan.drop_late_chain if remove else 1

    def _refill(self, table: Any, family: Family, name: str, rules: Sequence[Rule], *, exists: bool) -> None:
        """Create or flush one of portguard's chains and append its rules (in memory, committed by the caller)."""
        iptc = self._iptc()
        if exists:
            table.flush_entries(name)
        else:
            table.create_chain(name)
        own = iptc.Chain(table, name)
        for rule in rules:
            own.append_rule(self._build(family, rule))

    def ensure(self, rules: Sequence[Rule], seen: Observation | None = None) -> None:
        # libiptc works on a snapshot: plan again under the lock, whatever was seen before.
        grouped = xtables.by_family(rules)
        if Family.IPV4 in grouped:
            self._commit_family(Family.IPV4, grouped[Family.IPV4], remove=False)
        elif xtables.legacy_nat_registered(Family.IPV4):
            self._commit_family(Family.IPV4, [], remove=True)
        if xtables.legacy_nat_registered(Family.IPV6):
            self._ip6.ensure(grouped.get(Family.IPV6, []))

    def remove(self) -> int:
        removed = self._commit_family(Family.IPV4, [], remove=True) if xtables.legacy_nat_registered() else 0
        return removed + (self._ip6.remove() if xtables.legacy_nat_registered(Family.IPV6) else 0)

    def render(self, rules: Sequence[Rule]) -> str:
        out = []
        for family, frules in xtables.by_family(rules).items():
            how = "iptables-legacy-restore --noflush  (applied through libiptc, one commit)" if family is Family.IPV4 \
                else "ip6tables-legacy-restore --noflush"
            out.append(f"# {how}\n")
            out.append(xtables.render_restore(frules, xtables.full_plan()))
        return "".join(out)
