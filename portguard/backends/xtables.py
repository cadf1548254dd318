"""Pure logic shared by both iptables backends: render, parse listings, assess, plan.

Layout in the nat table of each family:

    -A POSTROUTING -m comment --comment "portguard:<jump>" -j PORTGUARD     (position 1)
    ... everyone else's rules ...
    -A POSTROUTING -m comment --comment "portguard:<late>" -j PORTGUARD-LATE     (last)
    -A PORTGUARD -o lo -m comment --comment "portguard:<h>" -j RETURN       (exclusions)
    -A PORTGUARD -p tcp -m tcp --sport 32768:61000 -m addrtype --src-type LOCAL -m comment \\
        --comment "portguard:<h>" -j SNAT --to-source :49152-61000
    -A PORTGUARD-LATE ... -j SNAT --to-source :49152-61000      (what nobody before translated)

Chains are needed because one iptables rule can carry only one ``-o``.  The early jump is the
object that must win the race for position 1 against Docker's ``-I POSTROUTING`` inserts; the
late jump must stay behind every rule that translates (a MASQUERADE ends the traversal of the
table for its packets, so rules after it see only what it did not translate).  The chains are
owned by name; in POSTROUTING only the exact jumps above are ours.
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
    "LATE_CHAIN",
    "LATE_JUMP_MARK",
    "Plan",
    "XRule",
    "assess",
    "decides_nat",
    "is_jump",
    "is_own_jump",
    "jump_spec",
    "legacy_nat_registered",
    "legacy_table_registered",
    "parse_rule",
    "render_restore",
    "rule_spec",
    "to_source",
]

CHAIN = "PORTGUARD"
LATE_CHAIN = "PORTGUARD-LATE"
POSTROUTING = "POSTROUTING"
JUMP_MARK = MARK_PREFIX + hashlib.sha256(f"jump {CHAIN}".encode()).hexdigest()[:8]
LATE_JUMP_MARK = MARK_PREFIX + hashlib.sha256(f"jump {LATE_CHAIN}".encode()).hexdigest()[:8]

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
    source: str | None = None  # "!10.0.0.0/8" when negated
    destination: str | None = None

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
    if rule.fwmark:
        parts += ["-m", "mark", "--mark", f"{rule.fwmark[0]:#x}/{rule.fwmark[1]:#x}"]
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


def jump_spec(late: bool = False) -> str:
    return f'-m comment --comment "{LATE_JUMP_MARK}" -j {LATE_CHAIN}' if late else \
        f'-m comment --comment "{JUMP_MARK}" -j {CHAIN}'


def is_jump(x: XRule, late: bool = False) -> bool:
    """Exactly portguard's (early or late) jump, as listed (iptables -S, or the legacy backend's equivalent)."""
    return x.chain == POSTROUTING and x.spec == jump_spec(late)


def is_own_jump(x: XRule) -> bool:
    return is_jump(x) or is_jump(x, late=True)


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
    comment = target = protocol = out_if = source = destination = None
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
        elif tok == "-s" and nxt is not None:
            source = ("!" if negate else "") + nxt
        elif tok == "-d" and nxt is not None:
            destination = ("!" if negate else "") + nxt
        negate = False
        i += 2 if nxt is not None and tok.startswith("-") and not nxt.startswith("-") else 1
    return XRule(chain, spec, comment, target, protocol, out_if, source, destination)


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


def hairpin(x: XRule) -> bool:
    """Docker's MASQUERADE for a container reaching itself through a published port (``-s C -d C``, appended by
    ``docker run -p``): its packets leave through the container's bridge, never where the late chain translates."""
    return x.source is not None and x.source == x.destination and not x.source.startswith("!")


@dataclass(frozen=True, slots=True)
class Plan:
    """What one atomic write must do for one family's nat table."""

    rewrite_chain: bool
    delete_postrouting: tuple[str, ...]  # specs of owned POSTROUTING rules to delete, as listed
    insert_jump: bool
    drop_chain: bool = False
    rewrite_late_chain: bool = False
    append_late_jump: bool = False
    drop_late_chain: bool = False

    @property
    def empty(self) -> bool:
        return not (self.rewrite_chain or self.delete_postrouting or self.insert_jump or self.drop_chain
                    or self.rewrite_late_chain or self.append_late_jump or self.drop_late_chain)


def _early_state(postrouting: Sequence[XRule], rules: Sequence[Rule]) -> tuple[State, str, list[str]]:
    """The early jump must come before every foreign rule that can decide NAT for its packets."""
    jumps = [i for i, x in enumerate(postrouting) if is_jump(x)]
    shadows = [x.spec for x in postrouting[: jumps[0] if jumps else 0] if not is_own_jump(x) and decides_nat(x, rules)]
    if not jumps:
        return State.ABSENT, f"no jump to {CHAIN} in nat POSTROUTING", shadows
    if shadows:
        return State.SHADOWED, f"runs after: {shadows[0]}", shadows
    if len(jumps) > 1:
        return State.DUPLICATED, f"{len(jumps)} jumps to {CHAIN}", shadows
    return State.HEALTHY, "", shadows


def _late_state(postrouting: Sequence[XRule], rules: Sequence[Rule]) -> tuple[State, str]:
    """The late jump must come after every foreign rule that translates: one behind it would lose to it."""
    jumps = [i for i, x in enumerate(postrouting) if is_jump(x, late=True)]
    if not jumps:
        return State.ABSENT, f"no jump to {LATE_CHAIN} in nat POSTROUTING"
    if len(jumps) > 1:
        return State.DUPLICATED, f"{len(jumps)} jumps to {LATE_CHAIN}"
    after = [x.spec for x in postrouting[jumps[0] + 1 :]
             if not is_own_jump(x) and decides_nat(x, rules) and not hairpin(x)]
    if after:
        return State.MISORDERED, f"{LATE_CHAIN} is not behind: {after[0]}"
    return State.HEALTHY, ""


def _chain_statuses(rules: Sequence[Rule], chain: Sequence[XRule] | None, name: str,
                    hook: tuple[State, str]) -> tuple[list[RuleStatus], list[str], bool]:
    """States of one chain's rules, its stale entries, and whether it must be rewritten."""
    entries = list(chain or ())
    marks = [x.comment for x in entries if x.owned]
    wanted = [r.mark for r in rules]
    stale = [f"{name}: {x.spec}" for x in entries if x.comment not in wanted]
    present_in_order = list(dict.fromkeys(m for m in marks if m in wanted))
    statuses = []
    for rule in rules:
        count = marks.count(rule.mark)
        if chain is None or count == 0:
            state, detail = State.ABSENT, f"not in chain {name}" if chain is not None else f"no chain {name}"
        elif count > 1:
            state, detail = State.DUPLICATED, f"{count} copies in chain {name}"
        elif hook[0] is not State.HEALTHY:
            state, detail = hook
        elif present_in_order != [m for m in wanted if m in present_in_order]:
            state, detail = State.MISORDERED, f"chain {name} is out of order"
        else:
            state, detail = State.HEALTHY, ""
        statuses.append(RuleStatus(rule, state, detail))
    exact = chain is not None and [x.comment for x in entries] == wanted
    return statuses, stale, not exact


def assess(
    backend: str,
    rules: Sequence[Rule],
    postrouting: Sequence[XRule],
    chain: Sequence[XRule] | None,
    late_chain: Sequence[XRule] | None = None,
) -> tuple[Observation, Plan]:
    """Compare one family's listing with its desired rules: the decision table, in one place."""
    # In POSTROUTING (not portguard's chains) only the exact jumps are portguard's: a foreign rule that merely
    # carries a look-alike comment stays, whatever it is.
    early_rules = [r for r in rules if not r.late]
    late_rules = [r for r in rules if r.late]
    early_hook, early_detail, shadows = _early_state(postrouting, early_rules)
    late_hook, late_detail = _late_state(postrouting, late_rules)
    early, stale, rewrite = _chain_statuses(early_rules, chain, CHAIN, (early_hook, early_detail))
    late, late_stale, rewrite_late = _chain_statuses(late_rules, late_chain, LATE_CHAIN, (late_hook, late_detail))
    found = {s.rule: s for s in (*early, *late)}
    deletes = [x.spec for x in postrouting if is_jump(x)] if early_hook is not State.HEALTHY else []
    if late_rules and late_hook is not State.HEALTHY:
        deletes += [x.spec for x in postrouting if is_jump(x, late=True)]
    if not late_rules:
        # No late rules wanted (nothing configured to translate): what is there of the late chain is stale.
        deletes += [x.spec for x in postrouting if is_jump(x, late=True)]
        late_stale += [f"{x.chain}: {x.spec}" for x in postrouting if is_jump(x, late=True)]
    plan = Plan(
        rewrite_chain=rewrite,
        delete_postrouting=tuple(deletes),
        insert_jump=early_hook is not State.HEALTHY,
        rewrite_late_chain=bool(late_rules) and rewrite_late,
        append_late_jump=bool(late_rules) and late_hook is not State.HEALTHY,
        drop_late_chain=not late_rules and late_chain is not None,
    )
    obs = Observation(backend, tuple(found[r] for r in rules), tuple(stale + late_stale), tuple(shadows))
    return obs, plan


def render_restore(rules: Sequence[Rule], plan: Plan) -> str:
    """An ``iptables-restore --noflush`` batch carrying out ``plan``.

    Declaring a chain creates it or, under --noflush, flushes it (iptables-restore flushes a declared user
    chain); deletes name the full listed rule, so a rule changed since we read makes the whole batch fail
    instead of deleting something else.
    """
    lines = ["*nat"]
    for rewrite, name, late in ((plan.rewrite_chain, CHAIN, False), (plan.rewrite_late_chain, LATE_CHAIN, True)):
        if rewrite:
            lines.append(f":{name} - [0:0]")
            lines.extend(f"-A {name} {rule_spec(r)}" for r in rules if r.late is late)
    lines.extend(f"-D {POSTROUTING} {spec}" for spec in plan.delete_postrouting)
    for drop, name in ((plan.drop_chain, CHAIN), (plan.drop_late_chain, LATE_CHAIN)):
        if drop:
            lines += [f"-F {name}", f"-X {name}"]
    if plan.insert_jump:
        lines.append(f"-I {POSTROUTING} 1 {jump_spec()}")
    if plan.append_late_jump:
        lines.append(f"-A {POSTROUTING} {jump_spec(late=True)}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def removal_plan(postrouting: Sequence[XRule], chain: Sequence[XRule] | None,
                 late_chain: Sequence[XRule] | None = None) -> Plan:
    """Everything portguard owns in one family's nat table, to be deleted."""
    return Plan(
        rewrite_chain=False,
        delete_postrouting=tuple(x.spec for x in postrouting if is_own_jump(x)),
        insert_jump=False,
        drop_chain=chain is not None,
        drop_late_chain=late_chain is not None,
    )


def full_plan() -> Plan:
    return Plan(rewrite_chain=True, delete_postrouting=(), insert_jump=True, rewrite_late_chain=True,
                append_late_jump=True)


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
