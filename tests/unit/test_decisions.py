"""The decision tables: a listing in, per-rule states and the write plan out."""

from __future__ import annotations

from typing import Any

from portguard.backends.base import Observation, State
from portguard.backends.nftables import PRIORITY, TableView
from portguard.backends.nftables import assess as nft_assess
from portguard.backends.xtables import CHAIN, JUMP_MARK, assess, parse_rule, removal_plan, rule_spec
from portguard.rules import Action, Family, PortRange, Protocol, Rule

EXCL = Rule(Family.IPV4, Action.RETURN, out_interface="docker0")
MASQ = Rule(Family.IPV4, Action.MASQUERADE, None, Protocol.TCP, PortRange(32768, 61000), PortRange(49152, 61000))
RULES = [EXCL, MASQ]
JUMP = f'-A POSTROUTING -m comment --comment "{JUMP_MARK}" -j PORTGUARD'
DOCKER = "-A POSTROUTING -s 172.18.0.0/16 ! -o br-1 -j MASQUERADE"


def _parse(lines: list[str]) -> list[Any]:
    return [x for x in map(parse_rule, lines) if x is not None]


def _chain(rules: list[Rule]) -> list[Any]:
    return _parse([f"-A {CHAIN} {rule_spec(r)}" for r in rules])


def _states(obs: Any) -> list[State]:
    return [s.state for s in obs.statuses]


def test_parse_rule_reads_comment_target_protocol_and_negated_interface() -> None:
    """`iptables -S` lines parse into the fields the decisions use; -P and -N lines are skipped."""
    x = parse_rule(DOCKER)
    assert x is not None and x.target == "MASQUERADE" and x.out_interface == "!br-1" and not x.owned
    j = parse_rule(JUMP)
    assert j is not None and j.owned and j.comment == JUMP_MARK and j.target == CHAIN
    assert parse_rule("-P POSTROUTING ACCEPT") is None and parse_rule("-N PORTGUARD") is None


def test_healthy_listing_needs_no_write() -> None:
    """Jump first, chain exact: every rule healthy and an empty plan."""
    obs, plan = assess("t", RULES, _parse([JUMP, DOCKER]), _chain(RULES))
    assert _states(obs) == [State.HEALTHY] * 2 and obs.healthy and plan.empty


def test_no_chain_is_absent_and_plans_everything() -> None:
    """Nothing installed: absent, and the plan writes chain and jump."""
    obs, plan = assess("t", RULES, _parse([DOCKER]), None)
    assert _states(obs) == [State.ABSENT] * 2
    assert plan.rewrite_chain and plan.insert_jump and plan.delete_postrouting == ()


def test_docker_rule_above_the_jump_shadows_and_the_jump_moves() -> None:
    """A deciding foreign rule before the jump: shadowed; the plan deletes the jump by its text and re-inserts it."""
    obs, plan = assess("t", RULES, _parse([DOCKER, JUMP]), _chain(RULES))
    assert _states(obs) == [State.SHADOWED] * 2 and obs.shadowed_by == (DOCKER[len("-A POSTROUTING ") :],)
    assert not plan.rewrite_chain and plan.insert_jump
    assert plan.delete_postrouting == (JUMP[len("-A POSTROUTING ") :],)


def test_passive_or_disjoint_rules_above_do_not_shadow() -> None:
    """LOG, another protocol, or an excluded output interface can't decide NAT for portguard's packets."""
    above = ["-A POSTROUTING -j LOG", "-A POSTROUTING -p udp -j MASQUERADE", "-A POSTROUTING -o docker0 -j MASQUERADE"]
    obs, plan = assess("t", RULES, _parse([*above, JUMP]), _chain(RULES))
    assert obs.healthy and plan.empty


def test_two_jumps_are_duplicated_and_both_are_replaced_by_one() -> None:
    """A copied jump: duplicated; the plan deletes both copies and inserts one."""
    obs, plan = assess("t", RULES, _parse([JUMP, JUMP]), _chain(RULES))
    assert _states(obs) == [State.DUPLICATED] * 2
    assert len(plan.delete_postrouting) == 2 and plan.insert_jump


def test_duplicate_in_chain_and_stale_variant_rewrite_the_chain() -> None:
    """A rule twice in the chain is duplicated; a marked rule nobody wants is stale; both rewrite the chain."""
    old = Rule(Family.IPV4, Action.MASQUERADE, None, Protocol.TCP, PortRange(32768, 61000), PortRange(50000, 61000))
    obs, plan = assess("t", RULES, _parse([JUMP]), _chain([EXCL, MASQ, MASQ, old]))
    assert _states(obs) == [State.HEALTHY, State.DUPLICATED]
    assert len(obs.stale) == 1 and old.mark in obs.stale[0]
    assert plan.rewrite_chain and not plan.insert_jump


def test_out_of_order_chain_is_misordered() -> None:
    """The MASQUERADE before the exclusions would translate excluded traffic: misordered."""
    obs, plan = assess("t", RULES, _parse([JUMP]), _chain([MASQ, EXCL]))
    assert State.MISORDERED in _states(obs) and plan.rewrite_chain


def test_look_alike_rules_in_postrouting_are_foreign_and_left_alone() -> None:
    """In POSTROUTING only the exact jump is portguard's: a rule carrying one of its marks, a 'portguard:' prefix or
    the jump's mark on another target is never stale and never deleted (it may still shadow, as any foreign rule)."""
    strays = [f"-A POSTROUTING {rule_spec(MASQ)}", '-A POSTROUTING -m comment --comment "portguard:deadbeef" -j ACCEPT',
              '-A POSTROUTING -m comment --comment "portguard: manual seed, keep" -j MASQUERADE']
    obs, plan = assess("t", RULES, _parse([JUMP, *strays]), _chain(RULES))
    assert obs.healthy and not obs.stale and plan.empty
    removal = removal_plan(_parse([*strays, JUMP]), _chain(RULES))
    assert removal.delete_postrouting == (JUMP[len("-A POSTROUTING "):],)


def _nft_chain(prio: int = PRIORITY, **kw: Any) -> dict[str, Any]:
    return {
        "family": "inet",
        "table": "portguard",
        "name": "postrouting",
        "type": "nat",
        "hook": "postrouting",
        "prio": prio,
        "policy": "accept",
        **kw,
    }


def _nft(rules: list[Rule], chains: list[dict[str, Any]], comments: list[str] | None,
         flags: frozenset[str] = frozenset()) -> Any:
    view = TableView({"postrouting": list(comments)} if comments is not None else None, flags)
    statuses, stale, shadowed_by = nft_assess(rules, chains, view)
    return Observation("nftables", tuple(statuses), tuple(stale), tuple(shadowed_by))


def test_nft_healthy_and_absent() -> None:
    """Our table with both marks is healthy; without the table every rule is absent."""
    own = [r.mark for r in RULES]
    assert _nft(RULES, [_nft_chain()], own).healthy
    assert [s.state for s in _nft(RULES, [], None).statuses] == [State.ABSENT] * 2


def test_nft_earlier_nat_chain_shadows_only_its_family_and_is_no_reason_to_write() -> None:
    """An ip-family nat chain at priority <= ours shadows IPv4 rules; one at srcnat (100) doesn't.  Shadowing by a
    foreign chain is unfixable: reported (not healthy) but never a reason to rewrite."""
    own = [r.mark for r in RULES]
    later = {"family": "ip", "table": "nat", "name": "POSTROUTING", "type": "nat", "hook": "postrouting", "prio": 100}
    early = {**later, "table": "x", "prio": 0}
    assert _nft(RULES, [_nft_chain(), later], own).healthy
    obs = _nft(RULES, [_nft_chain(), later, early], own)
    assert {s.state for s in obs.statuses} == {State.SHADOWED} and obs.shadowed_by == ("ip x POSTROUTING (priority 0)",)
    assert not obs.healthy and not obs.needs_write and obs.unfixable
    v6 = Rule(Family.IPV6, Action.RETURN, out_interface="lo")
    assert _nft([v6], [_nft_chain(), early], [v6.mark]).healthy


def test_nft_wrong_priority_counts_as_absent_and_duplicates_are_seen() -> None:
    """A chain re-created at another priority is not ours to trust; two copies of a mark are duplicated."""
    own = [r.mark for r in RULES]
    assert {s.state for s in _nft(RULES, [_nft_chain(prio=100)], own).statuses} == {State.ABSENT}
    dup = [*own, MASQ.mark]
    assert [s.state for s in _nft(RULES, [_nft_chain()], dup).statuses] == [State.HEALTHY, State.DUPLICATED]


def test_nft_dormant_table_is_drift_that_a_write_fixes() -> None:
    """'flags dormant' keeps the rules listed but inactive: every rule is dormant, and it needs a write."""
    obs = _nft(RULES, [_nft_chain()], [r.mark for r in RULES], frozenset({"dormant"}))
    assert {s.state for s in obs.statuses} == {State.DORMANT} and obs.needs_write and not obs.healthy


def test_nft_standby_table_never_shadows_the_primary() -> None:
    """portguard's own standby at srcnat - 9 is not a foreign chain."""
    standby = _nft_chain(prio=91, table="portguard_standby")
    assert _nft(RULES, [_nft_chain(), standby], [r.mark for r in RULES]).healthy
