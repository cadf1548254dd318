"""Docker's networks as an inventory part: what each one asks of source NAT on this host.

Only ``bridge`` networks are translated on this host by Docker (its ``-s SUBNET ! -o BRIDGE -j MASQUERADE``),
so only they are listed:

* ``host``/``none`` have no subnet: host traffic is covered by portguard's host rule;
* ``macvlan``/``ipvlan`` frames leave through the parent interface below the host's IP stack:
  no postrouting NAT happens on this host for them;
* ``overlay`` (Swarm) egress leaves through ``docker_gwbridge``, itself a bridge network.

Options read (as dockerd 20.10-28 name them): ``com.docker.network.bridge.enable_ip_masquerade``
(false: Docker does not masquerade), ``com.docker.network.host_ipv4``/``host_ipv6`` (Docker
SNATs to that address: ``-j SNAT --to-source ADDR``, still so in Docker 28.5.2),
``com.docker.network.bridge.gateway_mode_ipv4``/``_ipv6`` = ``routed`` (Docker >= 27: no nat rule;
``nat-unprotected`` is masqueraded like ``nat``), ``com.docker.network.bridge.name``; ``Internal``
networks have no way out.  Docker masquerades IPv6 subnets too where it writes ip6tables (the default
since Docker 27).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from portguard.config import Config, interface_ok
from portguard.inventory import Network, Part, address, canonical_cidrs

__all__ = ["DockerStatus", "ask", "diagnose", "parse_networks", "read_part"]

_OPT = "com.docker.network."
_TRUE = ("1", "true", "yes", "on")


def _subnets(ipam: object) -> tuple[str, ...]:
    configs = ipam.get("Config") if isinstance(ipam, Mapping) else None
    return canonical_cidrs(entry.get("Subnet") for entry in (configs if isinstance(configs, list) else [])
                           if isinstance(entry, Mapping))


def parse_networks(raw: Iterable[Mapping[str, Any]]) -> tuple[Network, ...]:
    """Bridge networks with a way out, from the Engine API's ``GET /networks`` list, sorted by name.

    Anything malformed is skipped rather than guessed at, and so is a bridge name no backend can represent
    identically; rules are only derived from values that parse as addresses and subnets.
    """
    networks = []
    for net in raw:
        if not isinstance(net, Mapping) or net.get("Driver") != "bridge" or net.get("Internal"):
            continue
        name, net_id = str(net.get("Name") or ""), str(net.get("Id") or "")
        raw_options = net.get("Options")
        options: Mapping[str, Any] = raw_options if isinstance(raw_options, Mapping) else {}
        subnets = _subnets(net.get("IPAM"))
        bridge = str(options.get(_OPT + "bridge.name") or ("docker0" if name == "bridge" else f"br-{net_id[:12]}"))
        if not name or not net_id or not subnets or not interface_ok(bridge):
            continue
        networks.append(
            Network(
                runtime="docker",
                name=name,
                id=net_id,
                bridge=bridge,
                subnets=subnets,
                masquerade=str(options.get(_OPT + "bridge.enable_ip_masquerade", "true")).lower() in _TRUE,
                host_ipv4=address(options.get(_OPT + "host_ipv4"), 4),
                host_ipv6=address(options.get(_OPT + "host_ipv6"), 6),
                routed_ipv4=str(options.get(_OPT + "bridge.gateway_mode_ipv4", "")).startswith("routed"),
                routed_ipv6=str(options.get(_OPT + "bridge.gateway_mode_ipv6", "")).startswith("routed"),
            )
        )
    return tuple(sorted(networks, key=lambda n: (n.name, n.id)))


def skipped(raw: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of bridge networks left out because no backend can represent their bridge's name identically."""
    out = []
    for net in raw:
        options = net.get("Options") if isinstance(net, Mapping) else None
        bridge = options.get(_OPT + "bridge.name") if isinstance(options, Mapping) else None
        if isinstance(bridge, str) and bridge and not interface_ok(bridge):
            out.append(str(net.get("Name")))
    return out


def read_part(docker_host: str = "", timeout: float = 2.0) -> Part | None:
    """Docker's part once (for one-shot commands); None when Docker cannot be asked."""
    try:
        import docker  # deferred: commands that never ask Docker don't pay for it

        kwargs = {"base_url": docker_host} if docker_host else docker.utils.kwargs_from_env()
        client = docker.APIClient(timeout=timeout, **kwargs)
        try:
            return Part(parse_networks(client.networks()))
        finally:
            client.close()
    except Exception:  # noqa: BLE001  # unreachable, refused, not installed: unknown, never an error here
        return None


@dataclass(frozen=True, slots=True)
class DockerStatus:
    """Docker's own answer: its version and firewall backend, or why it could not be asked."""

    version: str = ""
    firewall: str | None = None  # ``docker info`` FirewallBackend.Driver: Docker >= 28 only
    error: str = ""  # non-empty: Docker did not answer


def ask(docker_host: str = "", timeout: float = 2.0) -> DockerStatus:
    """``GET /version`` and ``GET /info``, once."""
    try:
        import docker  # deferred: commands that never ask Docker don't pay for it
    except ImportError:
        return DockerStatus(error="docker-py is not installed")
    try:
        kwargs = {"base_url": docker_host} if docker_host else docker.utils.kwargs_from_env()
        client = docker.APIClient(timeout=timeout, **kwargs)
        try:
            version = str(client.version().get("Version") or "?")
            info: dict[str, Any] = client.info()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001  # refused, missing socket, timeout: all mean "does not answer"
        return DockerStatus(error=(str(exc).splitlines() or [type(exc).__name__])[0][:200])
    fw = info.get("FirewallBackend") or {}
    driver = fw.get("Driver") if isinstance(fw, dict) else None
    return DockerStatus(version, str(driver) if driver else None)


def diagnose(cfg: Config, part: Part | None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Does Docker answer, what does it say of its firewall, and are its own nat rules in place?"""
    from portguard.detect import docker_iptables_flavour, docker_nft_table, firewall_kind

    status = ask(cfg.docker_host)
    networks = [n.name for n in part.networks] if part else []
    facts: dict[str, Any] = {"reachable": not status.error, "version": status.version or None,
                             "firewall_driver": status.firewall, "networks": networks}
    if status.error:
        seen = f"; rules follow the networks the daemon last saw ({', '.join(networks)})" if networks else ""
        return facts, [("info", f"Docker is not reachable or not running ({status.error}): the rules protect the "
                                f"host without it{seen}")]
    backend = (f"its firewall backend is {status.firewall}" if status.firewall
               else "its firewall backend is unknown (Docker < 28 does not report it)")
    findings = [("info", f"Docker {status.version} answers; {backend}")]
    if firewall_kind(status.firewall) == "nftables":
        own = docker_nft_table()
        facts["own_rules"] = "nftables" if own else None
    else:
        own = docker_iptables_flavour() is not None
        facts["own_rules"] = docker_iptables_flavour()
        if own:
            findings.append(("info", f"Docker writes iptables-{facts['own_rules']}"))
    if not own:
        findings.append(("risk", "Docker answers but its own nat rules are missing (flushed, e.g. by `nft flush "
                                 "ruleset`?): published ports and its networks' isolation do not work until "
                                 "dockerd restarts (systemctl restart docker), unless it runs with --iptables=false"))
    return facts, findings
