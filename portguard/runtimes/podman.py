"""Podman's rootful networks (netavark) as an inventory part.

What netavark does (read in its source, and seen with netavark 1.4.0's iptables driver and 1.17.2's nftables
driver): every ``bridge`` network in managed mode that is not ``internal`` gets, per subnet, a chain entered for
``saddr SUBNET`` that accepts ``daddr SUBNET`` and masquerades everything else except multicast
(``224.0.0.0/4``, ``ff00::/8``); with ``outbound_addr4``/``outbound_addr6`` (newer netavark) it SNATs to that
address instead.  ``mode=unmanaged`` gets no firewall rules at all.

Networks are JSON files, ``/etc/containers/networks/NAME.json`` (``network_config_dir`` in containers.conf
moves them); the default network (``podman``, bridge ``podman0``, ``10.88.0.0/16`` unless containers.conf's
``default_network``/``default_subnet`` say otherwise) exists only in Podman's memory while no ``podman.json``
is written, so it is assumed wherever Podman is installed.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from portguard.config import interface_ok
from portguard.inventory import MULTICAST, Network, Part, address, canonical_cidrs

__all__ = ["Fingerprint", "default_network", "parse_network", "read_part", "watched_paths"]

CONF_FILES = (Path("/usr/share/containers/containers.conf"), Path("/etc/containers/containers.conf"))
CONF_DIR = Path("/etc/containers/containers.conf.d")
NETWORKS_DIR = Path("/etc/containers/networks")
_MAX_FILE = 1 << 20


def _version(cidr: str) -> int:
    return 6 if ":" in cidr else 4


def parse_network(doc: Mapping[str, Any]) -> Network | None:
    """One netavark network file; None unless it is a managed bridge network with a representable interface."""
    name, bridge, raw_options, raw_subnets = (doc.get(k) for k in ("name", "network_interface", "options", "subnets"))
    options: Mapping[str, Any] = raw_options if isinstance(raw_options, Mapping) else {}
    if doc.get("driver") != "bridge" or not isinstance(name, str) or not name:
        return None
    if not isinstance(bridge, str) or not interface_ok(bridge):
        return None
    subnets = canonical_cidrs(s.get("subnet") for s in (raw_subnets if isinstance(raw_subnets, list) else [])
                              if isinstance(s, Mapping))
    managed = str(options.get("mode", "") or "managed") == "managed"
    masquerade = managed and not doc.get("internal")
    keep = (*subnets, *(MULTICAST[v] for v in sorted({_version(s) for s in subnets})))
    outbound = {v: options.get(f"outbound_addr{v}") for v in (4, 6)}
    return Network("podman", name, bridge, subnets, masquerade,
                   host_ipv4=address(outbound[4], 4) if masquerade else None,
                   host_ipv6=address(outbound[6], 6) if masquerade else None,
                   keep_destinations=keep if masquerade else (), id=str(doc.get("id") or ""))


def _containers_conf(files: Iterable[Path]) -> dict[str, Any]:
    """The ``[network]`` table of containers.conf, later files overriding earlier ones."""
    merged: dict[str, Any] = {}
    for path in files:
        try:
            if path.is_file() and path.stat().st_size <= _MAX_FILE:
                table = tomllib.loads(path.read_text()).get("network")
                merged.update(table if isinstance(table, dict) else {})
        except (OSError, ValueError):
            continue
    return merged


def _conf_files() -> list[Path]:
    drop_ins = sorted(CONF_DIR.glob("*.conf")) if CONF_DIR.is_dir() else []
    return [*CONF_FILES, *drop_ins]


def default_network(conf: Mapping[str, Any]) -> Network:
    """Podman's in-memory default network, as containers.conf shapes it."""
    name = str(conf.get("default_network") or "podman")
    subnets = canonical_cidrs([conf.get("default_subnet") or "10.88.0.0/16"]) or ("10.88.0.0/16",)
    return Network("podman", name, "podman0", subnets, True,
                   keep_destinations=(*subnets, *(MULTICAST[v] for v in sorted({_version(s) for s in subnets}))))


def installed() -> bool:
    return shutil.which("podman") is not None or NETWORKS_DIR.is_dir()


def watched_paths(conf: Mapping[str, Any] | None = None) -> list[Path]:
    """What to look at for changes: the configuration files and the network directory they name."""
    conf = _containers_conf(_conf_files()) if conf is None else conf
    return [Path(str(conf.get("network_config_dir") or NETWORKS_DIR)), CONF_DIR, *CONF_FILES]


class Fingerprint:
    """What changes when Podman's networks may have: its installation, its configuration files and network files.
    containers.conf (30 KB as Debian ships it) is parsed again only when one of those files changed."""

    def __init__(self, stat: Callable[[list[Path]], tuple[object, ...]]) -> None:
        self._stat = stat
        self._conf_print: tuple[object, ...] | None = None
        self._conf: Mapping[str, Any] = {}

    def __call__(self) -> tuple[object, ...]:
        conf_print = self._stat([CONF_DIR, *CONF_FILES])
        if conf_print != self._conf_print:
            self._conf_print, self._conf = conf_print, _containers_conf(_conf_files())
        return installed(), conf_print, self._stat(watched_paths(self._conf)[:1])


def read_part() -> Part | None:
    """Podman's networks; None where Podman is not installed (no part, no rules)."""
    if not installed():
        return None
    conf = _containers_conf(_conf_files())
    directory = Path(str(conf.get("network_config_dir") or NETWORKS_DIR))
    networks: dict[str, Network] = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            if path.stat().st_size > _MAX_FILE:
                continue
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        net = parse_network(doc) if isinstance(doc, dict) else None
        if net is not None:
            networks[net.name] = net
    default = default_network(conf)
    networks.setdefault(default.name, default)  # a written podman.json replaces the in-memory one
    return Part(tuple(sorted(networks.values(), key=lambda n: n.name)))
