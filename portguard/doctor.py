"""``portguard doctor``: why a host is (un)protected, in one report.

Each check yields findings; a finding is either ``info`` or a ``risk`` (traffic unprotected or
at risk).  Exit 0 without risks, 1 with any, 2 on error.  A runtime not running is information:
the rules protect the host without it.  Each runtime says what it knows of itself (runtimes/);
the doctor only collects.
"""

from __future__ import annotations

import collections
import ipaddress
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from portguard.audit import Scope, audit
from portguard.backends import Observation
from portguard.backends.bypass import find_bypasses
from portguard.backends.foreign import foreign_nat, uncovered
from portguard.config import Config
from portguard.conntrack import Flow, list_flows
from portguard.desired import configured_networks, desired_rules
from portguard.detect import select_backend
from portguard.inventory import Inventory
from portguard.reconciler import Reconciler
from portguard.rules import Action, Family, PortRange, Rule
from portguard.runtimes import READERS

__all__ = ["Finding", "Report", "capacity_use", "escaping_ports", "run_doctor"]

CAPACITY_RISK = 0.75  # share of the target range in use towards one destination


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    severity: str  # "info" | "risk"
    message: str


@dataclass
class Report:
    backend: str = ""
    backend_reason: str = ""
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, check: str, severity: str, message: str) -> None:
        self.findings.append(Finding(check, severity, message))

    @property
    def risks(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "risk"]


def escaping_ports(local: PortRange, source: PortRange) -> list[PortRange]:
    """Parts of the kernel's ephemeral range that lie outside ``source_ports`` (left untranslated)."""
    out = []
    if local.low < source.low:
        out.append(PortRange(local.low, min(local.high, source.low - 1)))
    if local.high > source.high:
        out.append(PortRange(max(local.low, source.high + 1), local.high))
    return out


def capacity_use(flows: list[Flow], target: PortRange) -> tuple[int, str]:
    """The most target ports in use towards one destination (address, port, protocol), and which."""
    per_dest: collections.Counter[str] = collections.Counter(
        f"{f.protocol} {f.dst}:{f.dport}" for f in flows if f.reply_dport in target and f.reply_dport != f.sport
    )
    if not per_dest:
        return 0, ""
    dest, used = per_dest.most_common(1)[0]
    return used, dest


def _local_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> PortRange | None:
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return None
    return PortRange(low, high)


def _ownership(report: Report, obs: Observation) -> None:
    report.facts["owner"] = obs.owner or None
    if obs.backend != "nftables":
        return
    if obs.owner:
        report.add("ownership", "info", f"table inet portguard is owned by a running portguard ({obs.owner}): the "
                   "kernel refuses every other process's change to it; a standby table at srcnat - 9 keeps the rules "
                   "when portguard stops")
    else:
        release = platform.release().split(".")
        supported = [int(x) for x in release[:2] if x.isdigit()] >= [5, 12]
        report.add("ownership", "info", "table inet portguard is not owned (no `portguard run` here): "
                   "`nft flush ruleset` would remove the rules until the daemon puts them back; "
                   + ("this kernel supports table ownership" if supported else
                      f"kernel {platform.release()} has no table ownership (5.12+): the daemon repairs instead"))


def _explain_traffic(report: Report, cfg: Config, rules: Sequence[Rule], inventory: Inventory) -> None:
    """One line per traffic class: what leaves the host, address and port (README: What portguard changes)."""
    ports, to = cfg.source_ports, cfg.to_ports
    lines = [f"host traffic (any local address): address unchanged, source port {ports} moved into {to}"]
    for runtime, (value, mask) in inventory.marks:
        lines.append(f"packets marked {value:#x}/{mask:#x} ({runtime}'s masquerade): masqueraded to the egress "
                     f"address, as {runtime} would, port moved into {to}")
    for net in (*inventory.networks, *configured_networks(cfg)):
        for subnet in net.subnets:
            version = ipaddress.ip_network(subnet).version
            keep = [k for k in net.keep_destinations if ipaddress.ip_network(k).version == version]
            but = f" (towards {', '.join(keep)}: address unchanged)" if keep and net.translates(version) else ""
            lines.append(f"{net.runtime} network {net.name} {subnet}: {net.how(version)}{but}, port moved into {to}")
    lines.append(f"other forwarded traffic that nothing on this host translates (a routed LAN, pod to pod): address "
                 f"unchanged, port moved into {to}")
    lines.append("traffic another program translates in a way portguard does not know: that program's translation, "
                 "port unchanged (named below when found)")
    for cidr in cfg.egress_exclude_destinations:
        lines.append(f"to {cidr}: unchanged (egress.exclude_destinations)")
    excluded = list(dict.fromkeys(r.out_interface for r in rules
                                  if r.action is Action.RETURN and r.out_interface and not r.late))
    lines.append(f"leaving through {', '.join(excluded) or 'no interface'}: unchanged (loopback and the runtimes' "
                 "bridges)")
    report.facts["traffic"] = lines
    report.facts["runtimes"] = inventory.to_doc()
    for line in lines:
        report.add("traffic", "info", line)


def _runtimes(report: Report, cfg: Config, inventory: Inventory) -> None:
    """Each runtime's own word on itself (Docker: does it answer, are its rules there), and what none covers."""
    for name, reader in READERS.items():
        if reader.diagnose is None:
            continue
        facts, findings = reader.diagnose(cfg, inventory.part(name))
        report.facts[name] = facts
        for severity, message in findings:
            report.add(name, severity, message)


def _uncovered(report: Report, cfg: Config, inventory: Inventory, families: Sequence[Family]) -> None:
    covered = [s for n in (*inventory.networks, *configured_networks(cfg)) if n.translates(4) or n.translates(6)
               for s in n.subnets]
    found = uncovered(foreign_nat(families), covered)
    report.facts["uncovered"] = [{"where": r.where, "rule": r.rule, "source": r.source} for r in found]
    for r in found:
        if r.source:
            cover = f'cover it with [masquerade] sources = ["{r.source}"] (its traffic then leaves translated the ' \
                    "same way, with the port moved)"
            report.add("uncovered", "risk", f"{r.source} is translated by another program ({r.where}: {r.rule}): its "
                       f"connections leave with their original port; {cover}")
        else:
            report.add("uncovered", "risk", f"a rule of another program translates traffic from any source ({r.where}: "
                       f"{r.rule}): connections it matches leave with their original port; list the networks it "
                       "serves in [masquerade] sources (and where they keep their address in keep_destinations)")


def run_doctor(cfg: Config, inventory: Inventory = Inventory()) -> Report:  # noqa: B008  # a frozen value
    report = Report()
    selection = select_backend(cfg.backend, docker_host=cfg.docker_host)
    report.backend, report.backend_reason = selection.backend.name, selection.reason
    for why in selection.skipped:
        report.add("backend", "info", f"skipped: {why}")
    for conflict in selection.conflicts:
        report.add("docker", "risk", conflict)
    _runtimes(report, cfg, inventory)

    # The rules, and everything that decides NAT before them.
    families = [f for f in cfg.families if f in selection.backend.families()]
    for missing in (f for f in cfg.families if f not in families):
        report.add("families", "info", f"{missing.value} is not translated: this host cannot do {missing.value} NAT "
                   f"with backend {selection.backend.name}; the other families are enforced")
    rules = desired_rules(cfg, inventory, families)
    _explain_traffic(report, cfg, rules, inventory)
    _uncovered(report, cfg, inventory, families)
    log = structlog.get_logger("portguard.doctor")
    obs = Reconciler(selection.backend, rules, log, conflicts=selection.conflicts).observe()
    _ownership(report, obs)
    for bypass in find_bypasses(families):
        report.add("bypass", "risk", f"{bypass}: connections it matches get no conntrack entry, so no NAT at all; "
                   "portguard does not touch other tables: remove or narrow that rule")
    report.facts["rules"] = {s.rule.name: s.state.value for s in obs.statuses}
    for s in obs.statuses:
        if s.state.value != "healthy":
            report.add("rules", "risk", f"{s.rule.name} is {s.state.value}" + (f": {s.detail}" if s.detail else ""))
    for obj in obs.stale:
        report.add("rules", "info", f"stale portguard object (apply removes it): {obj}")
    for shadow in obs.shadowed_by:
        report.add("precedence", "risk", f"runs before portguard and can decide NAT for the same packets: {shadow}")

    # Ports the kernel may pick that the rule does not match.
    local = _local_range()
    report.facts["ip_local_port_range"] = str(local) if local else None
    if local:
        for part in escaping_ports(local, cfg.source_ports):
            report.add("port_range", "risk", f"net.ipv4.ip_local_port_range {local} includes {part}, outside "
                       f"source_ports {cfg.source_ports}: connections from those ports leave untranslated")

    # Capacity of the target range, and its current use from conntrack.
    # One read of conntrack serves the capacity figure and the effect audit.
    flows = list_flows(cfg.families, cfg.protocols)
    used, dest = capacity_use(flows, cfg.to_ports)
    size = cfg.to_ports.size
    report.facts["capacity"] = {"ports": size, "max_in_use": used, "destination": dest}
    severity = "risk" if used >= CAPACITY_RISK * size else "info"
    report.add("capacity", severity, f"target range {cfg.to_ports} allows {size} concurrent connections per "
               f"destination; most in use: {used}" + (f" towards {dest}" if dest else ""))

    # The effect audit.
    untranslated = audit(flows, source=cfg.source_ports, target=cfg.to_ports, scope=Scope.of(cfg, rules))
    report.facts["untranslated_flows"] = len(untranslated)
    if untranslated:
        sample = ", ".join(f"{f.protocol} {f.src}:{f.sport} -> {f.dst}:{f.dport}" for f in untranslated[:3])
        report.add("audit", "risk", f"{len(untranslated)} flows left with an untranslated source port: {sample}")
    return report


def report_doc(report: Report) -> dict[str, Any]:
    """The fields of doctor's JSON document (report.py adds ``command`` and ``exit``)."""
    return {"backend": report.backend, "backend_reason": report.backend_reason, "healthy": not report.risks,
            "findings": [asdict(f) for f in report.findings], "facts": report.facts}


def render_text(report: Report) -> str:
    lines = [f"backend: {report.backend} ({report.backend_reason})"]
    for f in report.findings:
        mark = "RISK" if f.severity == "risk" else "ok  "
        lines.append(f"{mark} {f.check:<11} {f.message}")
    lines.append(f"{len(report.risks)} risk(s)" if report.risks else "no risks found")
    return "\n".join(lines)
