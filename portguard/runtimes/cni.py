"""The CNI networks a Kubernetes node declares, and flannel's, as an inventory part.

* CNI configuration lists (``/etc/cni/net.d``; k3s keeps its own under ``/var/lib/rancher/k3s/agent``): a
  ``bridge`` plugin with ``ipMasq`` is masqueraded by the plugin itself, per container, as containernetworking's
  ``ip.SetupIPMasq`` writes it (``-d SUBNET -j ACCEPT``, ``! -d 224.0.0.0/4 -j MASQUERADE``); its bridge (``cni0``
  unless named) is where pod-to-pod traffic on the node stays.  A ``flannel`` plugin delegates to such a bridge
  (``cni0``) for the node's pod subnet from ``subnet.env``.
* flannel's ``/run/flannel/subnet.env``: ``FLANNEL_NETWORK`` (the cluster CIDR), ``FLANNEL_SUBNET`` (this node's
  pods), the IPv6 pair, and ``FLANNEL_IPMASQ``: with it flannel masquerades what leaves the cluster
  (``-s CLUSTER ! -d 224.0.0.0/4 -j MASQUERADE --random-fully``) and returns what stays in it (pod to pod, on this
  node or another) untranslated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from portguard.config import interface_ok
from portguard.inventory import MULTICAST, Network, Part, canonical_cidrs

__all__ = ["CONF_DIRS", "SUBNET_ENV", "parse_conflist", "parse_subnet_env", "read_part", "watched_paths"]

CONF_DIRS = (Path("/etc/cni/net.d"), Path("/var/lib/rancher/k3s/agent/etc/cni/net.d"))
SUBNET_ENV = Path("/run/flannel/subnet.env")
_MAX_FILE = 1 << 20
_TRUE = ("1", "true", "yes", "on")


def _multicast(subnets: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(MULTICAST[v] for v in sorted({6 if ":" in s else 4 for s in subnets}))


def parse_subnet_env(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines; anything else is ignored."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.startswith("FLANNEL_"):
            out[key] = value.strip().strip('"')
    return out


def flannel_network(env: Mapping[str, str]) -> Network | None:
    cluster = canonical_cidrs([env.get("FLANNEL_NETWORK"), env.get("FLANNEL_IPV6_NETWORK")])
    if not cluster:
        return None
    masquerade = env.get("FLANNEL_IPMASQ", "false").lower() in _TRUE
    return Network("flannel", "cluster", "", cluster, masquerade,
                   keep_destinations=(*cluster, *_multicast(cluster)) if masquerade else ())


def _ipam_subnets(ipam: object) -> tuple[str, ...]:
    if not isinstance(ipam, Mapping):
        return ()
    found: list[object] = [ipam.get("subnet")]
    for ranges in ipam.get("ranges") or []:
        found += [r.get("subnet") for r in ranges if isinstance(r, Mapping)] if isinstance(ranges, list) else []
    return canonical_cidrs(x for x in found if x)


def parse_conflist(doc: Mapping[str, Any], flannel: Mapping[str, str]) -> list[Network]:
    """The bridge networks a CNI configuration (list or single) declares."""
    name = str(doc.get("name") or "")
    raw_plugins = doc.get("plugins")
    plugins: list[Any] = raw_plugins if isinstance(raw_plugins, list) else [doc]
    out = []
    for plugin in plugins:
        if not isinstance(plugin, Mapping):
            continue
        if plugin.get("type") == "bridge":
            subnets = _ipam_subnets(plugin.get("ipam"))
            masquerade = bool(plugin.get("ipMasq"))
            bridge = str(plugin.get("bridge") or "cni0")
        elif plugin.get("type") == "flannel":
            raw_delegate = plugin.get("delegate")
            delegate: Mapping[str, Any] = raw_delegate if isinstance(raw_delegate, Mapping) else {}
            subnets = canonical_cidrs([flannel.get("FLANNEL_SUBNET"), flannel.get("FLANNEL_IPV6_SUBNET")])
            # flannel's CNI plugin masquerades in the bridge only when flannel itself does not (ipMasq = !ipmasq)
            default = flannel.get("FLANNEL_IPMASQ", "false").lower() not in _TRUE
            masquerade = bool(delegate.get("ipMasq", default))
            bridge = str(delegate.get("bridge") or "cni0")
        else:
            continue
        if not name or not interface_ok(bridge):
            continue
        keep = (*subnets, *_multicast(subnets)) if masquerade else ()
        out.append(Network("cni", name, bridge, subnets, masquerade and bool(subnets), keep_destinations=keep))
    return out


def _read(path: Path) -> str | None:
    try:
        if not path.is_file() or path.stat().st_size > _MAX_FILE:
            return None
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _conf_files() -> list[Path]:
    files: list[Path] = []
    for directory in CONF_DIRS:
        if directory.is_dir():
            files += sorted(p for p in directory.iterdir() if p.suffix in (".conflist", ".conf", ".json"))
    return files


def watched_paths() -> list[Path]:
    return [*CONF_DIRS, SUBNET_ENV]


def read_part() -> Part | None:
    """The node's CNI and flannel networks; None where there is neither (no part, no rules)."""
    env_text = _read(SUBNET_ENV)
    flannel = parse_subnet_env(env_text) if env_text is not None else {}
    networks: dict[tuple[str, str], Network] = {}
    for path in _conf_files():
        text = _read(path)
        try:
            doc = json.loads(text) if text is not None else None
        except ValueError:
            continue
        for net in parse_conflist(doc, flannel) if isinstance(doc, dict) else []:
            networks.setdefault((net.name, net.bridge), net)
    cluster = flannel_network(flannel)
    if cluster is not None:
        networks[("flannel", "")] = cluster
    if not networks and env_text is None:
        return None
    return Part(tuple(networks.values()))
