"""``portguard doctor``: why a host is (un)protected, in one report.

Each check yields findings; a finding is either ``info`` or a ``risk`` (traffic unprotected or
at risk).  Exit 0 without risks, 1 with any, 2 on error.  Docker not running is information: the
rule protects the host without it.
"""

from __future__ import annotations

import collections
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from portguard.audit import audit
from portguard.backends import Observation
from portguard.backends.bypass import find_bypasses
from portguard.config import Config
from portguard.conntrack import Flow, list_flows
from portguard.desired import desired_rules
from portguard.detect import Selection, docker_firewall_driver, docker_iptables_flavour, select_backend
from portguard.networks import DockerNetwork
from portguard.reconciler import Reconciler
from portguard.rules import PortRange, Rule

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


def _explain_traffic(report: Report, cfg: Config, rules: Sequence[Rule], networks: Sequence[DockerNetwork]) -> None:
    """One line per traffic class: what leaves the host, address and port (README: What portguard changes)."""
    ports, to = cfg.source_ports, cfg.to_ports
    lines = [f"host traffic (any local address): address unchanged, source port {ports} moved into {to}"]
    special = {r.source: r for r in rules if r.source}
    for net in networks:
        for subnet in net.subnets:
            rule = special.get(subnet)
            if rule is None:
                how = "masqueraded to the egress address as Docker would"
            elif rule.to_address:
                how = f"SNAT to {rule.to_address} as Docker would (host_ipv4/host_ipv6)"
            else:
                how = "address unchanged (Docker does not NAT it)"
            lines.append(f"Docker network {net.name} {subnet}: {how}, port moved into {to}")
    lines.append(f"other forwarded traffic: masqueraded to the egress address, port moved into {to}")
    for cidr in cfg.egress_exclude_destinations:
        lines.append(f"to {cidr}: unchanged (egress.exclude_destinations)")
    lines.append(f"leaving through {', '.join(cfg.egress_exclude_interfaces) or 'no interface'}: unchanged")
    report.facts["traffic"] = lines
    for line in lines:
        report.add("traffic", "info", line)


def _docker(report: Report, cfg: Config, selection: Selection) -> None:
    """Docker: reachability is information; a flavour mismatch is a risk for the iptables backends."""
    firewall = docker_firewall_driver(cfg.docker_host)
    flavour = selection.docker_flavour or docker_iptables_flavour()
    report.facts["docker"] = {"firewall_driver": firewall, "iptables_flavour": flavour}
    if firewall is None and flavour is None:
        report.add("docker", "info", "Docker not reachable or not running: the rule protects the host without it")
    elif flavour:
        suffix = f" (firewall {firewall})" if firewall else ""
        report.add("docker", "info", f"Docker writes iptables-{flavour}{suffix}")
    for conflict in selection.conflicts:
        report.add("docker", "risk", conflict)


def run_doctor(cfg: Config, networks: Sequence[DockerNetwork] = ()) -> Report:
    report = Report()
    selection = select_backend(cfg.backend, docker_host=cfg.docker_host)
    report.backend, report.backend_reason = selection.backend.name, selection.reason
    for why in selection.skipped:
        report.add("backend", "info", f"skipped: {why}")

    _docker(report, cfg, selection)

    # The rules, and everything that decides NAT before them.
    families = [f for f in cfg.families if f in selection.backend.families()]
    for missing in (f for f in cfg.families if f not in families):
        report.add("families", "info", f"{missing.value} is not translated: this host cannot do {missing.value} NAT "
                   f"with backend {selection.backend.name}; the other families are enforced")
    rules = desired_rules(cfg, networks, families)
    _explain_traffic(report, cfg, rules, networks)
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
    untranslated = audit(flows, source=cfg.source_ports, target=cfg.to_ports, interfaces=cfg.egress_interfaces,
                         excluded=cfg.egress_exclude_interfaces)
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
