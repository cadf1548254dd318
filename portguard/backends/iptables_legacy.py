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
from portguard.backends.base import Observation
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


class IptablesLegacyBackend:
    name = "iptables-legacy"

    def __init__(self) -> None:
        self._mod: Any = None

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

    def _read(self, table: Any) -> tuple[list[tuple[xtables.XRule, Any]], list[xtables.XRule] | None]:
        iptc = self._iptc()
        postrouting = [(self._xrule("POSTROUTING", r), r) for r in iptc.Chain(table, "POSTROUTING").rules]
        chain = None
        if table.is_chain(xtables.CHAIN):
            chain = [self._xrule(xtables.CHAIN, r) for r in iptc.Chain(table, xtables.CHAIN).rules]
        return postrouting, chain

    @staticmethod
    def _xrule(chain: str, r: Any) -> xtables.XRule:
        """Reduce a libiptc rule to the fields decisions use, with an ``iptables -S``-like text."""
        parts: list[str] = []
        for flag, value in (("-s", r.src), ("-d", r.dst)):
            negated = bool(value) and value.startswith("!")
            net = ipaddress.ip_network(value.lstrip("!"), strict=False) if value else None
            if net is not None and net.prefixlen:
                parts += ["!", flag, net.with_prefixlen] if negated else [flag, net.with_prefixlen]
        out_if = r.out_interface or None
        if out_if:
            parts += ["!", "-o", out_if[1:]] if out_if.startswith("!") else ["-o", out_if]
        proto = r.protocol if r.protocol not in (None, "ip", "ipv6", "all") else None
        if proto:
            parts += ["-p", proto]
        comment = None
        for m in r.matches:
            parts += ["-m", m.name]
            if m.name == "comment":
                comment = m.comment
                parts += ["--comment", f'"{comment}"']
            elif m.name in ("tcp", "udp") and m.sport:
                parts += ["--sport", m.sport]
        target = r.target.name or None if r.target else None
        if target:
            parts += ["-j", target]
            if target == "MASQUERADE":
                to_ports = r.target.to_ports
                if to_ports:
                    parts += ["--to-ports", to_ports]
        return xtables.XRule(chain, " ".join(parts), comment, target, proto, out_if)

    def _assess(self, family: Family, rules: Sequence[Rule]) -> Observation:
        if not xtables.legacy_nat_registered(family):
            return xtables.assess(self.name, rules, [], None)[0]
        postrouting, chain = self._read(self._table(family))
        return xtables.assess(self.name, rules, [x for x, _ in postrouting], chain)[0]

    def observe(self, rules: Sequence[Rule]) -> Observation:
        grouped = xtables.by_family(rules)
        families = [f for f in Family if f in grouped or xtables.legacy_nat_registered(f)]
        parts = [self._assess(f, grouped.get(f, [])) for f in families]
        return xtables.merge(self.name, parts)

    # ---- writing ----

    def _build(self, family: Family, rule: Rule | None) -> Any:
        """A libiptc rule for ``rule``, or for the jump when ``rule`` is None."""
        iptc = self._iptc()
        r = iptc.Rule() if family is Family.IPV4 else iptc.Rule6()
        if rule is None:
            r.create_match("comment").comment = xtables.JUMP_MARK
            r.create_target(xtables.CHAIN)
            return r
        if rule.out_interface:
            r.out_interface = rule.out_interface
        if rule.protocol:
            r.protocol = rule.protocol.value
            if rule.sport:
                r.create_match(rule.protocol.value).sport = f"{rule.sport.low}:{rule.sport.high}"
        r.create_match("comment").comment = rule.mark
        if rule.action is Action.RETURN:
            r.create_target("RETURN")
        else:
            target = r.create_target("MASQUERADE")
            if rule.to_ports:
                target.to_ports = str(rule.to_ports)
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
        postrouting, chain = self._read(table)
        pr_chain = iptc.Chain(table, "POSTROUTING")
        if remove:
            victims = [obj for x, obj in postrouting if x.owned]
            for obj in victims:
                pr_chain.delete_rule(obj)
            if chain is not None:
                table.flush_entries(xtables.CHAIN)
                table.delete_chain(xtables.CHAIN)
            return len(victims) + (chain is not None)
        _, plan = xtables.assess(self.name, rules, [x for x, _ in postrouting], chain)
        if plan.empty:
            return 0
        if plan.rewrite_chain:
            if chain is None:
                table.create_chain(xtables.CHAIN)
            else:
                table.flush_entries(xtables.CHAIN)
            own = iptc.Chain(table, xtables.CHAIN)
            for rule in rules:
                own.append_rule(self._build(family, rule))
        doomed = set(plan.delete_postrouting)
        for x, obj in postrouting:
            if x.owned and x.spec in doomed:
                pr_chain.delete_rule(obj)
        if plan.insert_jump:
            pr_chain.insert_rule(self._build(family, None))
        return 1

    def ensure(self, rules: Sequence[Rule], seen: Observation | None = None) -> None:
        # libiptc works on a snapshot: plan again under the lock, whatever was seen before.
        grouped = xtables.by_family(rules)
        for family in Family:
            if family in grouped:
                self._commit_family(family, grouped[family], remove=False)
            elif xtables.legacy_nat_registered(family):
                self._commit_family(family, [], remove=True)

    def remove(self) -> int:
        return sum(self._commit_family(f, [], remove=True) for f in Family if xtables.legacy_nat_registered(f))

    def render(self, rules: Sequence[Rule]) -> str:
        out = []
        for family, frules in xtables.by_family(rules).items():
            tool = "iptables-legacy-restore" if family is Family.IPV4 else "ip6tables-legacy-restore"
            out.append(f"# {tool} --noflush  (applied through libiptc, one commit)\n")
            out.append(xtables.render_restore(frules, xtables.full_plan()))
        return "".join(out)
