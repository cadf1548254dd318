"""Which backend to use, and which iptables flavour Docker writes — without creating tables.

The flavour test follows kubernetes-sigs/iptables-wrappers: look where the rules are.  Docker
keeps a ``DOCKER`` chain in the nat table of the flavour it uses.  Listing a legacy table
through libiptc or ``iptables-legacy`` loads and registers it (which changes the order of NAT
hooks, see FACTS.md), so the legacy side is only asked when ``/proc/net/ip_tables_names``
already lists ``nat``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from portguard.backends import Backend, make_backend
from portguard.backends.xtables import legacy_nat_registered
from portguard.config import BACKEND_NAMES
from portguard.errors import FatalError

__all__ = ["Selection", "docker_firewall_driver", "docker_iptables_flavour", "docker_nft_table", "firewall_kind",
           "select_backend"]

AUTO_ORDER = BACKEND_NAMES


def _postrouting_count(flavour: str) -> int | None:
    """Rules in ``flavour``'s nat POSTROUTING if it has a DOCKER chain, else None."""
    tool = f"iptables-{flavour}"
    if not shutil.which(tool) or (flavour == "legacy" and not legacy_nat_registered()):
        return None
    try:
        probe = subprocess.run(
            [tool, "-w", "5", "-t", "nat", "-S", "DOCKER"], capture_output=True, timeout=10, check=False
        )
        if probe.returncode != 0:
            return None
        listing = subprocess.run(
            [tool, "-w", "5", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True, timeout=10, check=False
        )
    except (subprocess.TimeoutExpired, OSError):
        return None
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("-A"))


def docker_iptables_flavour() -> str | None:
    """``"nft"`` or ``"legacy"``: the flavour whose nat table holds Docker's chain; None if neither."""
    nft, legacy = _postrouting_count("nft"), _postrouting_count("legacy")
    if nft is None and legacy is None:
        return None
    if legacy is None:
        return "nft"
    if nft is None:
        return "legacy"
    return "legacy" if legacy > nft else "nft"  # both: the busier one, as iptables-wrappers does


def docker_firewall_driver(docker_host: str = "", timeout: float = 2.0) -> str | None:
    """Docker's own word on its firewall (``docker info`` FirewallBackend, Docker >= 28); None if unknown."""
    from portguard.runtimes.docker import ask

    return ask(docker_host, timeout).firewall


def docker_nft_table() -> bool:
    """Does Docker's native nftables table exist (Docker 29's ``firewall-backend: nftables``: ``ip docker-bridges``)?"""
    from portguard.backends.nftables import Libnftables

    try:
        nft = Libnftables()
    except FatalError:
        return False
    try:
        return nft.run("list table ip docker-bridges")[0] == 0
    finally:
        nft.close()


def firewall_kind(driver: str | None) -> str | None:
    """'nftables+firewalld' and 'iptables+firewalld' (Docker >= 28 under firewalld) are their prefix."""
    return driver.split("+", 1)[0].strip().lower() or None if driver else None


@dataclass(frozen=True, slots=True)
class Selection:
    backend: Backend
    reason: str
    docker_flavour: str | None
    docker_firewall: str | None
    conflicts: tuple[str, ...]
    skipped: tuple[str, ...]  # "backend: why it was not usable", for the log


def select_backend(
    requested: str,
    *,
    docker_host: str = "",
    flavour_of_docker: Callable[[], str | None] = docker_iptables_flavour,
    firewall_of_docker: Callable[[str], str | None] = docker_firewall_driver,
    factory: Callable[[str], Backend] = make_backend,
) -> Selection:
    """Pick the backend: forced by name, or ``auto`` (nftables, then Docker's flavour, then the rest).

    Docker's flavour is only looked for when it matters (an iptables backend is forced, or
    nftables is unusable): listing a missing chain makes iptables-nft 1.8.9 load the whole nat
    table, about a second at 50,000 rules.
    """
    if requested == "nftables":
        backend = factory(requested)
        backend.probe()
        return Selection(backend, "forced by configuration (nftables)", None, None, (), ())
    skipped: list[str] = []
    if requested == "auto":
        try:
            backend = factory("nftables")
            backend.probe()
            reason = "nf_tables available: a chain at srcnat-10 runs before every xtables NAT rule"
            return Selection(backend, reason, None, None, (), ())
        except FatalError as exc:
            skipped.append(str(exc))
    flavour = flavour_of_docker()
    firewall = firewall_of_docker(docker_host)
    if requested != "auto":
        backend = factory(requested)
        backend.probe()
        conflicts: tuple[str, ...] = ()
        if flavour and requested != f"iptables-{flavour}":
            conflicts = (
                f"Docker writes iptables-{flavour} but backend {requested} was forced: NAT tables of "
                f"different flavours run in registration order, so Docker's MASQUERADE may decide first",
            )
        if firewall_kind(firewall) == "nftables":
            conflicts += (f"Docker writes native nftables but backend {requested} was forced",)
        return Selection(backend, f"forced by configuration ({requested})", flavour, firewall, conflicts, ())
    order = [f"iptables-{flavour}"] if flavour else []
    order += [name for name in AUTO_ORDER[1:] if name not in order]
    for name in order:
        try:
            backend = factory(name)
            backend.probe()
        except FatalError as exc:
            skipped.append(str(exc))
            continue
        why = f"Docker writes iptables-{flavour}" if flavour else "no Docker rules found, first usable flavour"
        return Selection(backend, f"nftables unusable; {why}", flavour, firewall, (), tuple(skipped))
    raise FatalError("no usable backend: " + "; ".join(skipped))
