"""Pure logic shared by both iptables backends: render, parse listings, assess, plan.

Layout in the nat table of each family:

    -A POSTROUTING -m comment --comment "portguard:<jump>" -j PORTGUARD     (position 1)
    -A PORTGUARD -o lo -m comment --comment "portguard:<h>" -j RETURN       (exclusions)
    -A PORTGUARD -p tcp -m tcp --sport 32768:61000 -m comment --comment "portguard:<h>" \\
        -j MASQUERADE --to-ports 49152-61000

A chain is needed because one iptables rule can carry only one ``-o``; the jump is the one
object that must win the race for position 1 against Docker's ``-I POSTROUTING`` inserts.
The chain ``PORTGUARD`` is owned by name; in POSTROUTING only the exact jump above is ours.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from portguard.backends.base import Observation, RuleStatus, State
from portguard.rules import MARK_PREFIX, Action, Family, Rule, is_mark

__all__ = [
    "CHAIN",
    "JUMP_MARK",
    "Plan",
    "XRule",
    "assess",
    "decides_nat",
    "is_jump",
    "jump_spec",
    "legacy_nat_registered",
    "legacy_table_registered",
    "parse_rule",
    "render_restore",
    "rule_spec",
    "to_source",
]

CHAIN = "PORTGUARD"
POSTROUTING = "POSTROUTING"
JUMP_MARK = MARK_PREFIX + hashlib.sha256(f"jump {CHAIN}".encode()).hexdigest()[:8]

# Targets in nat POSTROUTING that never end the traversal nor set a NAT binding.
_PASSIVE_TARGETS = frozenset({"LOG", "NFLOG", "ULOG", "TRACE", "MARK", "CONNMARK", "CT", "AUDIT"})


@dataclass(frozen=True, slots=True)
class XRule:
    """One listed rule, reduced to what portguard's decisions need."""

    chain: str
    spec: str  # the rule as listed, without "-A CHAIN"; usable verbatim after -D CHAIN
    comment: str | None
    target: str | None
    protocol: str | None  # "!tcp" when negated
    out_interface: str | None  # "!br-+" when negated

    @property
    def owned(self) -> bool:
        return is_mark(self.comment)


def to_source(rule: Rule) -> str:
    ports = f":{rule.to_ports}" if rule.to_ports else ""
    if not rule.to_address:
        return ports  # port-only: iptables 1.8.9 accepts ':LOW-HIGH' for both families
    return f"[{rule.to_address}]{ports}" if rule.family is Family.IPV6 else f"{rule.to_address}{ports}"


def rule_spec(rule: Rule) -> str:
    """The rule as ``iptables -S`` prints it (without ``-A PORTGUARD``): addresses, interface, protocol,
    then the matches in the order they are added, then the target."""
    parts: list[str] = []
    if rule.source:
        parts += ["-s", rule.source]
    if rule.destination:
        parts += ["-d", rule.destination]
    if rule.out_interface:
        parts += ["-o", rule.out_interface]  # the config's trailing '+' is iptables' own wildcard
    if rule.protocol:
        parts += ["-p", rule.protocol.value]
        if rule.sport:
            parts += ["-m", rule.protocol.value, "--sport", _sport(rule)]
    if rule.local_source:
        parts += ["-m", "addrtype", "--src-type", "LOCAL"]
    parts += ["-m", "comment", "--comment", f'"{rule.mark}"']
    if rule.action is Action.RETURN:
        parts += ["-j", "RETURN"]
    elif rule.action is Action.MASQUERADE:
        parts += ["-j", "MASQUERADE"]
        if rule.to_ports:
            parts += ["--to-ports", str(rule.to_ports) if rule.to_ports.size > 1 else str(rule.to_ports.low)]
    else:
        parts += ["-j", "SNAT", "--to-source", to_source(rule)]
    if rule.fully_random and rule.action is not Action.RETURN:
        parts.append("--random-fully")
    return " ".join(parts)


def _sport(rule: Rule) -> str:
    low, high = (rule.sport.low, rule.sport.high) if rule.sport else (1, 65535)
    return str(low) if low == high else f"{low}:{high}"


def jump_spec() -> str:
    return f'-m comment --comment "{JUMP_MARK}" -j {CHAIN}'


def is_jump(x: XRule) -> bool:
    """Exactly portguard's jump, as listed (iptables -S, or the legacy backend's equivalent text)."""
    return x.chain == POSTROUTING and x.comment == JUMP_MARK and x.target == CHAIN and x.spec == jump_spec()


def parse_rule(line: str) -> XRule | None:
    """Parse one ``-A CHAIN ...`` line of ``iptables -S``; other lines give None."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    if len(tokens) < 2 or tokens[0] != "-A":
        return None
    chain = tokens[1]
    spec = line.split(None, 2)[2] if len(tokens) > 2 else ""
    comment = target = protocol = out_if = None
    negate = False
    i = 2
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok == "!":
            negate = True
            i += 1
            continue
        if tok == "--comment" and nxt is not None:
            comment = nxt
        elif tok in ("-j", "-g") and nxt is not None:
            target = nxt
        elif tok == "-p" and nxt is not None:
            protocol = ("!" if negate else "") + nxt
        elif tok == "-o" and nxt is not None:
            out_if = ("!" if negate else "") + nxt
        negate = False
        i += 2 if nxt is not None and tok.startswith("-") and not nxt.startswith("-") else 1
    return XRule(chain, spec, comment, target, protocol, out_if)


def _iface_matches(pattern: str, name: str) -> bool:
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return pattern == name


def decides_nat(x: XRule, rules: Sequence[Rule]) -> bool:
    """Could this foreign POSTROUTING rule decide NAT for packets one of ``rules`` should get?

    Conservative: anything with a deciding target counts, unless its protocol or its positive
    output interface shows it can't see the packets portguard masquerades.
    """
    if x.target is None or x.target in _PASSIVE_TARGETS:
        return False
    masq = [r for r in rules if r.action is not Action.RETURN]
    positive_proto = x.protocol and not x.protocol.startswith("!") and x.protocol not in ("all", "0")
    if positive_proto and not any(r.protocol is None or r.protocol.value == x.protocol for r in masq):
        return False
    if x.out_interface and not x.out_interface.startswith("!"):
        excluded = [r.out_interface for r in rules if r.action is Action.RETURN and r.out_interface]
        if any(_iface_matches(p, x.out_interface) for p in excluded):
            return False
    return True


@dataclass(frozen=True, slots=True)
class Plan:
    """What one atomic write must do for one family's nat table."""

    rewrite_chain: bool
    delete_postrouting: tuple[str, ...]  # specs of owned POSTROUTING rules to delete, as listed
    insert_jump: bool
    drop_chain: bool = False

    @property
    def empty(self) -> bool:
        return not (self.rewrite_chain or self.delete_postrouting or self.insert_jump or self.drop_chain)


def assess(
    backend: str,
    rules: Sequence[Rule],
    postrouting: Sequence[XRule],
    chain: Sequence[XRule] | None,
) -> tuple[Observation, Plan]:
    """Compare one family's listing with its desired rules: the decision table, in one place."""
    # In POSTROUTING (not portguard's chain) only the exact jump is portguard's: a foreign rule that merely
    # carries a look-alike comment stays, whatever it is.
    jumps = [i for i, x in enumerate(postrouting) if is_jump(x)]
    stale_pr: list[XRule] = []
    shadows = [x.spec for x in postrouting[: jumps[0] if jumps else 0] if not is_jump(x) and decides_nat(x, rules)]
    if not jumps:
        hook, hook_detail = State.ABSENT, "no jump to PORTGUARD in nat POSTROUTING"
    elif shadows:
        hook, hook_detail = State.SHADOWED, f"runs after: {shadows[0]}"
    elif len(jumps) > 1:
        hook, hook_detail = State.DUPLICATED, f"{len(jumps)} jumps to PORTGUARD"
    else:
        hook, hook_detail = State.HEALTHY, ""

    entries = list(chain or ())
    marks = [x.comment for x in entries if x.owned]
    wanted = [r.mark for r in rules]
    stale = [f"{x.chain}: {x.spec}" for x in stale_pr]
    stale += [f"{CHAIN}: {x.spec}" for x in entries if x.comment not in wanted]

    statuses: list[RuleStatus] = []
    present_in_order = list(dict.fromkeys(m for m in marks if m in wanted))
    for rule in rules:
        count = marks.count(rule.mark)
        if chain is None or count == 0:
            state, detail = State.ABSENT, "not in chain PORTGUARD" if chain is not None else "no chain PORTGUARD"
        elif count > 1:
            state, detail = State.DUPLICATED, f"{count} copies in chain PORTGUARD"
        elif hook is not State.HEALTHY:
            state, detail = hook, hook_detail
        elif present_in_order != [m for m in wanted if m in present_in_order]:
            state, detail = State.MISORDERED, "chain PORTGUARD is out of order"
        else:
            state, detail = State.HEALTHY, ""
        statuses.append(RuleStatus(rule, state, detail))

    chain_exact = chain is not None and [x.comment for x in entries] == wanted
    plan = Plan(
        rewrite_chain=not chain_exact,
        delete_postrouting=tuple([postrouting[i].spec for i in jumps] if hook is not State.HEALTHY else [])
        + tuple(x.spec for x in stale_pr),
        insert_jump=hook is not State.HEALTHY,
    )
    obs = Observation(backend, tuple(statuses), tuple(stale), tuple(shadows))
    return obs, plan


def render_restore(rules: Sequence[Rule], plan: Plan) -> str:
    """An ``iptables-restore --noflush`` batch carrying out ``plan``.

    Declaring ``:PORTGUARD`` creates the chain or, under --noflush, flushes it (iptables-restore
    flushes a declared user chain); deletes name the full listed rule, so a rule changed
    since we read makes the whole batch fail instead of deleting something else.
    """
    lines = ["*nat"]
    if plan.rewrite_chain:
        lines.append(f":{CHAIN} - [0:0]")
        lines.extend(f"-A {CHAIN} {rule_spec(r)}" for r in rules)
    lines.extend(f"-D {POSTROUTING} {spec}" for spec in plan.delete_postrouting)
    if plan.drop_chain:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    if plan.insert_jump:
        lines.append(f"-I {POSTROUTING} 1 {jump_spec()}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def removal_plan(postrouting: Sequence[XRule], chain: Sequence[XRule] | None) -> Plan:
    """Everything portguard owns in one family's nat table, to be deleted."""
    return Plan(
        rewrite_chain=False,
        delete_postrouting=tuple(x.spec for x in postrouting if is_jump(x)),
        insert_jump=False,
        drop_chain=chain is not None,
    )


def full_plan() -> Plan:
    return Plan(rewrite_chain=True, delete_postrouting=(), insert_jump=True)


_TABLE_NAMES = {Family.IPV4: Path("/proc/net/ip_tables_names"), Family.IPV6: Path("/proc/net/ip6_tables_names")}


def legacy_table_registered(table: str, family: Family = Family.IPV4) -> bool:
    """Does this namespace have that legacy table?  Ask before touching one: libiptc, ``iptables-legacy``
    and even IPT_SO_GET_INFO register a missing table; for nat that reorders the NAT hooks (of equal
    priority, the most recently registered table runs first; iptables 1.8.9, kernel 6.x)."""
    try:
        return table in _TABLE_NAMES[family].read_text().split()
    except OSError:
        return False


def legacy_nat_registered(family: Family = Family.IPV4) -> bool:
    return legacy_table_registered("nat", family)


def by_family(rules: Sequence[Rule]) -> dict[Family, list[Rule]]:
    out: dict[Family, list[Rule]] = {}
    for r in rules:
        out.setdefault(r.family, []).append(r)
    return out


def merge(backend: str, parts: Sequence[Observation], plans: dict[Family, Plan] | None = None) -> Observation:
    return Observation(
        backend,
        tuple(s for p in parts for s in p.statuses),
        tuple(s for p in parts for s in p.stale),
        tuple(s for p in parts for s in p.shadowed_by),
        plan=plans,
    )
