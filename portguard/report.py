"""What the commands print: one text form for people, one JSON document of a stable shape for tools.

Shapes (every document has ``command`` and ``exit``):

* check: ``backend``, ``healthy``, ``owner``, ``rules`` [{``rule``, ``mark``, ``chain`` (early/late), ``state``,
  ``detail``, ``fixable``}], ``stale``, ``standby``, ``shadowed_by``, ``conflicts``, ``bypasses``
* apply: ``dry_run``, ``backend``, ``changed`` (dry run: would change), ``changes`` {``added``,
  ``replaced``, ``removed``}, ``found`` (the check shape before), ``result`` (after; null on a dry run)
* remove: ``backend``, ``removed`` (objects deleted)
* render: ``backend``, ``rules`` [{``rule``, ``mark``, ``chain``, ``family``, ``action``, ``spec``}], ``text``
* doctor: ``backend``, ``backend_reason``, ``healthy``, ``findings`` [{``check``, ``severity``,
  ``message``}], ``facts``
* any command, on error: ``error`` (the same line as on stderr)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from portguard.backends import Observation, State
from portguard.rules import Rule

__all__ = ["changes", "document", "observation_doc", "observation_text", "rules_doc"]


def observation_doc(obs: Observation) -> dict[str, Any]:
    return {
        "backend": obs.backend,
        "healthy": obs.healthy,
        "owner": obs.owner,
        "rules": [{"rule": s.rule.name, "mark": s.rule.mark, "chain": "late" if s.rule.late else "early",
                   "state": s.state.value, "detail": s.detail, "fixable": s.fixable} for s in obs.statuses],
        "stale": list(obs.stale),
        "standby": list(obs.standby),
        "shadowed_by": list(obs.shadowed_by),
        "conflicts": list(obs.conflicts),
        "bypasses": list(obs.bypasses),
    }


def changes(obs: Observation) -> dict[str, list[str]]:
    """What a write would do to what ``obs`` saw: rules added, rewritten in place, and objects removed."""
    added = [s.rule.name for s in obs.statuses if s.state is State.ABSENT and s.fixable]
    replaced = [f"{s.rule.name} ({s.state.value})" for s in obs.statuses
                if s.state not in (State.HEALTHY, State.ABSENT) and s.fixable]
    absent = f": {State.ABSENT.value}"
    added += [f"standby {item.removesuffix(absent)}" for item in obs.standby if item.endswith(absent)]
    replaced += [f"standby {item}" for item in obs.standby if not item.endswith(absent)]
    return {"added": added, "replaced": replaced, "removed": list(obs.stale)}


def rules_doc(rules: Sequence[Rule]) -> list[dict[str, str]]:
    return [{"rule": r.name, "mark": r.mark, "chain": "late" if r.late else "early", "family": r.family.value,
             "action": r.action.value, "spec": r.spec} for r in rules]


def document(command: str | None, code: int, **fields: Any) -> str:
    return json.dumps({"command": command, "exit": code, **fields}, indent=2)


def observation_text(obs: Observation) -> str:
    total = len(obs.statuses)
    owned = f", table owned by {obs.owner}" if obs.owner else ""
    if obs.healthy:
        return f"healthy: {total} rules in place and first to decide NAT (backend {obs.backend}{owned})"
    lines = [f"{s.state.value}: {s.rule.name} ({s.detail})" if s.detail else f"{s.state.value}: {s.rule.name}"
             for s in obs.statuses if s.state is not State.HEALTHY]
    lines += [f"stale: {obj}" for obj in obs.stale]
    lines += [f"standby: {item}" for item in obs.standby]
    lines += [f"conflict: {c}" for c in obs.conflicts]
    lines += [f"bypass: {b}" for b in obs.bypasses]
    bad = sum(1 for s in obs.statuses if s.state is not State.HEALTHY)
    lines.append(f"drift: {bad} of {total} rules unhealthy, {len(obs.stale)} stale (backend {obs.backend})")
    return "\n".join(lines)
