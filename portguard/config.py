"""The configuration: a frozen, validated value built from file, environment and flags.

Precedence, lowest first: built-in defaults, the TOML file, ``PORTGUARD_*`` environment
variables, command-line flags.  Every invalid value raises :class:`ConfigError` whose message
is one line naming the key, so nothing is ever written to the kernel from a bad config.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portguard.errors import ConfigError
from portguard.rules import Action, Family, PortRange, Protocol, Rule

__all__ = [
    "BACKENDS",
    "DEFAULT_CONFIG_PATH",
    "KEYS",
    "Config",
    "desired_rules",
    "load_config",
    "narrow_target_warning",
]

DEFAULT_CONFIG_PATH = Path("/etc/portguard/portguard.toml")
BACKENDS = ("auto", "nftables", "iptables-nft", "iptables-legacy")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
IFNAMSIZ = 16  # the kernel's limit includes the terminating NUL


@dataclass(frozen=True, slots=True)
class Config:
    backend: str = "auto"
    source_ports: PortRange = PortRange(32768, 61000)  # noqa: RUF009  # frozen value, safe to share
    to_ports: PortRange = PortRange(49152, 61000)  # noqa: RUF009  # frozen value, safe to share
    protocols: tuple[Protocol, ...] = (Protocol.TCP,)
    families: tuple[Family, ...] = (Family.IPV4,)
    egress_interfaces: tuple[str, ...] = ()
    egress_exclude_interfaces: tuple[str, ...] = ("lo", "docker0", "br-+")
    daemon_reconcile_interval: float = 30.0
    daemon_min_interval: float = 0.01
    daemon_max_backoff: float = 30.0
    daemon_poll_interval: float = 1.0
    daemon_conntrack_heal: bool = True
    daemon_storm_repairs: int = 10
    daemon_storm_window: float = 60.0
    daemon_audit_interval: float = 60.0
    docker_host: str = ""
    metrics_listen: str = "127.0.0.1:9640"
    log_format: str = "auto"
    log_level: str = "info"
    source: str = field(default="defaults", compare=False)


# ---- value parsers: each takes the raw value and the key, returns the typed value ----


def _port_range(raw: Any, key: str) -> PortRange:
    if isinstance(raw, int) and not isinstance(raw, bool):
        low = high = raw
    elif isinstance(raw, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[-:]\s*(\d+)\s*)?", raw)
        if not m:
            raise ConfigError(f"{key}: expected a port range like 32768-61000, got {raw!r}")
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) else low
    else:
        raise ConfigError(f"{key}: expected a port range like 32768-61000, got {raw!r}")
    for port in (low, high):
        if not 1 <= port <= 65535:
            raise ConfigError(f"{key}: port {port} is outside 1-65535")
    if low > high:
        raise ConfigError(f"{key}: low port {low} is above high port {high}")
    return PortRange(low, high)


def _str_list(raw: Any, key: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [s.strip() for s in raw.split(",") if s.strip()]
    elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        items = [s.strip() for s in raw]
    else:
        raise ConfigError(f"{key}: expected a list of strings, got {raw!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{key}: contains duplicates: {raw!r}")
    return tuple(items)


def _enum_list(choices: type[Protocol] | type[Family]) -> Callable[[Any, str], tuple[Any, ...]]:
    def parse(raw: Any, key: str) -> tuple[Any, ...]:
        items = _str_list(raw, key)
        if not items:
            raise ConfigError(f"{key}: must name at least one of {', '.join(c.value for c in choices)}")
        out = []
        for item in items:
            try:
                out.append(choices(item.lower()))
            except ValueError:
                allowed = ", ".join(c.value for c in choices)
                raise ConfigError(f"{key}: {item!r} is not one of {allowed}") from None
        return tuple(out)

    return parse


def validate_interface(name: str, key: str) -> str:
    """Apply the kernel's rules for interface names (dev_valid_name), plus a trailing '+' wildcard."""
    if not name:
        raise ConfigError(f"{key}: interface name is empty")
    if len(name.encode()) > IFNAMSIZ - 1:
        raise ConfigError(f"{key}: interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if name in (".", ".."):
        raise ConfigError(f"{key}: {name!r} is not a valid interface name")
    if "/" in name or ":" in name or any(c.isspace() for c in name):
        raise ConfigError(f"{key}: interface name {name!r} contains '/', ':' or whitespace")
    if "+" in name[:-1] or "*" in name:
        raise ConfigError(f"{key}: interface name {name!r}: only a trailing '+' is allowed as a wildcard")
    return name


def _interfaces(raw: Any, key: str) -> tuple[str, ...]:
    return tuple(validate_interface(n, key) for n in _str_list(raw, key))


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(raw: Any, key: str) -> str:
        if not isinstance(raw, str) or raw.lower() not in choices:
            raise ConfigError(f"{key}: {raw!r} is not one of {', '.join(choices)}")
        return raw.lower()

    return parse


def _positive_float(raw: Any, key: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number of seconds, got {raw!r}") from None
    if isinstance(raw, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: expected a positive number of seconds, got {raw!r}")
    return value


def _positive_int(raw: Any, key: str) -> int:
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {raw!r}")
    return raw


def _bool(raw: Any, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return raw.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{key}: expected true or false, got {raw!r}")


def _string(raw: Any, key: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    return raw


def _listen(raw: Any, key: str) -> str:
    value = _string(raw, key).strip()
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f'{key}: expected HOST:PORT (or "" to disable), got {raw!r}')
    return value


# Dotted key as written in the file -> (Config field, parser).
KEYS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "backend": ("backend", _choice(BACKENDS)),
    "source_ports": ("source_ports", _port_range),
    "to_ports": ("to_ports", _port_range),
    "protocols": ("protocols", _enum_list(Protocol)),
    "families": ("families", _enum_list(Family)),
    "egress.interfaces": ("egress_interfaces", _interfaces),
    "egress.exclude_interfaces": ("egress_exclude_interfaces", _interfaces),
    "daemon.reconcile_interval": ("daemon_reconcile_interval", _positive_float),
    "daemon.min_interval": ("daemon_min_interval", _positive_float),
    "daemon.max_backoff": ("daemon_max_backoff", _positive_float),
    "daemon.poll_interval": ("daemon_poll_interval", _positive_float),
    "daemon.conntrack_heal": ("daemon_conntrack_heal", _bool),
    "daemon.storm_repairs": ("daemon_storm_repairs", _positive_int),
    "daemon.storm_window": ("daemon_storm_window", _positive_float),
    "daemon.audit_interval": ("daemon_audit_interval", _positive_float),
    "docker.host": ("docker_host", _string),
    "metrics.listen": ("metrics_listen", _listen),
    "log.format": ("log_format", _choice(LOG_FORMATS)),
    "log.level": ("log_level", _choice(LOG_LEVELS)),
}


def env_name(key: str) -> str:
    return "PORTGUARD_" + key.replace(".", "_").upper()


_ENV_TO_KEY = {env_name(k): k for k in KEYS}
_ENV_NOT_KEYS = {"PORTGUARD_CONFIG"}


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in doc.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return _flatten(tomllib.load(fh))
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: invalid TOML: {exc}") from None


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config; ``path=None`` means the default path when it exists, else defaults."""
    env = os.environ if env is None else env
    if path is None and env.get("PORTGUARD_CONFIG"):
        path = Path(env["PORTGUARD_CONFIG"])
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    raw: dict[str, tuple[Any, str]] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        for key, value in _read_file(path).items():
            if key not in KEYS:
                raise ConfigError(f"{key}: unknown key in {path}")
            raw[key] = (value, key)
    for name, value in env.items():
        if not name.startswith("PORTGUARD_") or name in _ENV_NOT_KEYS:
            continue
        if name not in _ENV_TO_KEY:
            raise ConfigError(f"{name}: unknown environment variable")
        raw[_ENV_TO_KEY[name]] = (value, name)
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = (value, "--" + key.replace("_", "-").replace("log.", "log-"))
    fields: dict[str, Any] = {"source": source}
    for key, (value, origin) in raw.items():
        attr, parse = KEYS[key]
        fields[attr] = parse(value, origin)
    return Config(**fields)


def narrow_target_warning(cfg: Config) -> dict[str, Any] | None:
    """Fields for a warning when fewer target ports than matched ports are available."""
    if cfg.to_ports.size >= cfg.source_ports.size:
        return None
    return {
        "source_ports": str(cfg.source_ports),
        "to_ports": str(cfg.to_ports),
        "ratio": round(cfg.source_ports.size / cfg.to_ports.size, 2),
    }


def desired_rules(cfg: Config) -> tuple[Rule, ...]:
    """The ordered entries of portguard's chain: exclusions first, then the masquerades."""
    rules: list[Rule] = []
    for family in cfg.families:
        rules.extend(Rule(family, Action.RETURN, out_interface=name) for name in cfg.egress_exclude_interfaces)
        for out in cfg.egress_interfaces or (None,):
            rules.extend(
                Rule(family, Action.MASQUERADE, out, proto, cfg.source_ports, cfg.to_ports) for proto in cfg.protocols
            )
    return tuple(rules)
