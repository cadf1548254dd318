"""The configuration: a frozen, validated value built from file, environment and flags.

Precedence, lowest first: built-in defaults, the TOML file, ``PORTGUARD_*`` environment
variables, command-line flags.  Every invalid value raises :class:`ConfigError` whose message
is one line naming the key, so nothing is ever written to the kernel from a bad config.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portguard.errors import ConfigError
from portguard.rules import Family, PortRange, Protocol, parse_mark

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "DEFAULT_CONFIG_PATH",
    "KEYS",
    "Config",
    "iface_matches",
    "interface_ok",
    "load_config",
    "narrow_target_warning",
]

DEFAULT_CONFIG_PATH = Path("/etc/portguard/portguard.toml")
# The one list of backends: config validates against it, detect and backends build from it.
BACKEND_NAMES = ("nftables", "iptables-nft", "iptables-legacy")
BACKENDS = ("auto", *BACKEND_NAMES)
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
IFNAMSIZ = 16  # the kernel's limit includes the terminating NUL
MAX_CONFIG_BYTES = 1 << 20
MAX_LIST_ITEMS = 256
MAX_STRING = 4096


@dataclass(frozen=True, slots=True)
class Config:
    backend: str = "auto"
    source_ports: PortRange = PortRange(32768, 61000)  # noqa: RUF009  # frozen value, safe to share
    to_ports: PortRange = PortRange(49152, 61000)  # noqa: RUF009  # frozen value, safe to share
    protocols: tuple[Protocol, ...] = (Protocol.TCP,)
    families: tuple[Family, ...] = (Family.IPV4, Family.IPV6)
    fully_random: bool = False
    egress_interfaces: tuple[str, ...] = ()
    egress_exclude_interfaces: tuple[str, ...] = ("lo", "docker0", "br-+")
    egress_exclude_destinations: tuple[str, ...] = ()
    masquerade_sources: tuple[str, ...] = ()
    masquerade_keep_destinations: tuple[str, ...] = ()
    kubernetes_masquerade_mark: str = "auto"
    daemon_reconcile_interval: float = 30.0
    daemon_min_interval: float = 0.01
    daemon_max_backoff: float = 30.0
    daemon_poll_interval: float = 0.1
    daemon_conntrack_heal: bool = True
    daemon_storm_repairs: int = 10
    daemon_storm_window: float = 60.0
    daemon_audit_interval: float = 60.0
    docker_host: str = ""
    metrics_listen: str = "127.0.0.1:9640"
    log_format: str = "auto"
    log_level: str = "info"
    source: str = field(default="defaults", compare=False)


def _show(raw: Any) -> str:
    """A value as it can appear in a one-line error: repr, control characters escaped, cut short."""
    text = repr(raw) if not isinstance(raw, int) or abs(raw) < 10**18 else "a number too large"
    return text if len(text) <= 60 else text[:57] + "..."


# ---- value parsers: each takes the raw value and the key, returns the typed value ----


def _port_range(raw: Any, key: str) -> PortRange:
    if isinstance(raw, int) and not isinstance(raw, bool):
        low = high = raw
    elif isinstance(raw, str):
        m = re.fullmatch(r"\s*(\d{1,5})\s*(?:[-:]\s*(\d{1,5})\s*)?", raw)
        if not m:
            raise ConfigError(f"{key}: expected a port range like 32768-61000, got {_show(raw)}")
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) else low
    else:
        raise ConfigError(f"{key}: expected a port range like 32768-61000, got {_show(raw)}")
    for port in (low, high):
        if not 1 <= port <= 65535:
            raise ConfigError(f"{key}: port {_show(port)} is outside 1-65535")
    if low > high:
        raise ConfigError(f"{key}: low port {low} is above high port {high}")
    return PortRange(low, high)


def _text(raw: str, key: str) -> str:
    if len(raw) > MAX_STRING:
        raise ConfigError(f"{key}: value is longer than {MAX_STRING} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ConfigError(f"{key}: value contains a control character: {_show(raw)}")
    return raw


def _str_list(raw: Any, key: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [s.strip() for s in _text(raw, key).split(",") if s.strip()]
    elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        items = [_text(s, key).strip() for s in raw]
    else:
        raise ConfigError(f"{key}: expected a list of strings, got {_show(raw)}")
    if len(items) > MAX_LIST_ITEMS:
        raise ConfigError(f"{key}: more than {MAX_LIST_ITEMS} entries")
    return tuple(items)


def _no_duplicates(items: tuple[Any, ...], key: str) -> tuple[Any, ...]:
    seen = [str(i) for i in items]
    dupes = sorted({s for s in seen if seen.count(s) > 1})
    if dupes:
        raise ConfigError(f"{key}: lists {', '.join(dupes)} more than once")
    return items


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
                raise ConfigError(f"{key}: {_show(item)} is not one of {allowed}") from None
        return _no_duplicates(tuple(out), key)

    return parse


def validate_interface(name: str, key: str) -> str:
    """An interface name every backend represents identically: the kernel's rules (dev_valid_name), no
    character nft or iptables reads as syntax, and iptables' trailing '+' as the only wildcard."""
    why = ""
    if not name:
        why = "is empty"
    elif len(name.encode()) > IFNAMSIZ - 1:
        why = f"is longer than {IFNAMSIZ - 1} bytes"
    elif name in (".", ".."):
        why = "is not a valid interface name"
    elif "/" in name or ":" in name or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name):
        why = "contains '/', ':', whitespace or a control character"
    elif any(c in name for c in "\"'\\`"):
        why = "contains a quote or a backslash, which nft and iptables would read differently"
    elif name.startswith(("!", "@", "$")):
        # iptables (python-iptables too) reads a leading '!' as negation; nft reads '@' and '$' as references
        why = "starts with '!', '@' or '$', which a backend would read as an operator"
    elif "*" in name or "?" in name or "[" in name or "+" in name[:-1]:
        why = "uses a wildcard other than a trailing '+'"
    elif name == "+":
        why = "matches every interface"
    if why:
        raise ConfigError(f"{key}: interface name {_show(name)} {why}")
    return name


def interface_ok(name: str) -> bool:
    """Can every backend represent this interface name identically (a runtime's bridge, say)?"""
    try:
        validate_interface(name, "bridge")
    except ConfigError:
        return False
    return True


def iface_matches(pattern: str, name: str) -> bool:
    """iptables' rule: a trailing '+' matches any name starting with the rest."""
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def _interfaces(raw: Any, key: str) -> tuple[str, ...]:
    return _no_duplicates(tuple(validate_interface(n, key) for n in _str_list(raw, key)), key)


def _cidrs(raw: Any, key: str) -> tuple[str, ...]:
    out = []
    for item in _str_list(raw, key):
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {_show(item)} is not an IPv4 or IPv6 network (CIDR)") from None
        if net.prefixlen == 0:
            raise ConfigError(f"{key}: {_show(item)} matches every destination; drop the family instead")
        out.append(str(net))
    return _no_duplicates(tuple(out), key)


def _mark(raw: Any, key: str) -> str:
    """``auto`` (read kube-proxy's own rules), ``""`` (none) or a mark like ``0x4000/0x4000``, canonical."""
    value = _string(raw, key).strip().lower()
    if value in ("auto", ""):
        return value
    mark = parse_mark(value)
    if mark is None:
        raise ConfigError(f'{key}: expected "auto", "" or a mark like 0x4000/0x4000 (value/mask), got {_show(raw)}')
    return f"{mark[0]:#x}/{mark[1]:#x}"


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(raw: Any, key: str) -> str:
        if not isinstance(raw, str) or raw.lower() not in choices:
            raise ConfigError(f"{key}: {_show(raw)} is not one of {', '.join(choices)}")
        return raw.lower()

    return parse


def _seconds(low: float, high: float) -> Callable[[Any, str], float]:
    def parse(raw: Any, key: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str) or (isinstance(raw, str) and len(raw) > 32):
            raise ConfigError(f"{key}: expected a number of seconds, got {_show(raw)}")
        try:
            value = float(raw)
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number of seconds, got {_show(raw)}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise ConfigError(f"{key}: expected {low:g} to {high:g} seconds, got {_show(raw)}")
        return value

    return parse


def _count(low: int, high: int) -> Callable[[Any, str], int]:
    def parse(raw: Any, key: str) -> int:
        if isinstance(raw, str) and re.fullmatch(r"\s*\d{1,9}\s*", raw):
            raw = int(raw)
        if not isinstance(raw, int) or isinstance(raw, bool) or not low <= raw <= high:
            raise ConfigError(f"{key}: expected a whole number from {low} to {high}, got {_show(raw)}")
        return raw

    return parse


def _bool(raw: Any, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return raw.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{key}: expected true or false, got {_show(raw)}")


def _string(raw: Any, key: str) -> str:
    if not isinstance(raw, str):
        raise ConfigError(f"{key}: expected a string, got {_show(raw)}")
    return _text(raw, key)


def _docker_host(raw: Any, key: str) -> str:
    value = _string(raw, key).strip()
    if value and not re.fullmatch(r"(unix|tcp|http|https|ssh)://\S+", value):
        raise ConfigError(f"{key}: expected unix://PATH, tcp://HOST:PORT or ssh://HOST (or \"\"), got {_show(raw)}")
    return value


def _listen(raw: Any, key: str) -> str:
    value = _string(raw, key).strip()
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    try:
        addr = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        addr = None
    bracketed_v6 = addr is None or addr.version == 4 or host.startswith("[")
    if not sep or addr is None or not bracketed_v6 or not re.fullmatch(r"\d{1,5}", port) or not 0 < int(port) < 65536:
        raise ConfigError(f'{key}: expected IP:PORT or [IPv6]:PORT (or "" to disable), got {_show(raw)}')
    return value


# Dotted key as written in the file -> (Config field, parser).
KEYS: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "backend": ("backend", _choice(BACKENDS)),
    "source_ports": ("source_ports", _port_range),
    "to_ports": ("to_ports", _port_range),
    "protocols": ("protocols", _enum_list(Protocol)),
    "families": ("families", _enum_list(Family)),
    "fully_random": ("fully_random", _bool),
    "egress.interfaces": ("egress_interfaces", _interfaces),
    "egress.exclude_interfaces": ("egress_exclude_interfaces", _interfaces),
    "egress.exclude_destinations": ("egress_exclude_destinations", _cidrs),
    "masquerade.sources": ("masquerade_sources", _cidrs),
    "masquerade.keep_destinations": ("masquerade_keep_destinations", _cidrs),
    "kubernetes.masquerade_mark": ("kubernetes_masquerade_mark", _mark),
    "daemon.reconcile_interval": ("daemon_reconcile_interval", _seconds(1.0, 86400.0)),
    "daemon.min_interval": ("daemon_min_interval", _seconds(0.001, 60.0)),
    "daemon.max_backoff": ("daemon_max_backoff", _seconds(0.1, 3600.0)),
    "daemon.poll_interval": ("daemon_poll_interval", _seconds(0.05, 3600.0)),
    "daemon.conntrack_heal": ("daemon_conntrack_heal", _bool),
    "daemon.storm_repairs": ("daemon_storm_repairs", _count(1, 1_000_000)),
    "daemon.storm_window": ("daemon_storm_window", _seconds(1.0, 86400.0)),
    "daemon.audit_interval": ("daemon_audit_interval", _seconds(0.1, 86400.0)),
    "docker.host": ("docker_host", _docker_host),
    "metrics.listen": ("metrics_listen", _listen),
    "log.format": ("log_format", _choice(LOG_FORMATS)),
    "log.level": ("log_level", _choice(LOG_LEVELS)),
}


def env_name(key: str) -> str:
    return "PORTGUARD_" + key.replace(".", "_").upper()


_ENV_TO_KEY = {env_name(k): k for k in KEYS}
# Variables of ours that are not settings: the config path, and the image the deploy files (Swarm stack) take.
_ENV_NOT_KEYS = {"PORTGUARD_CONFIG", "PORTGUARD_IMAGE"}


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in doc.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            if prefix:
                raise ConfigError(f"{key}: unknown section")
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _read_file(path: Path) -> dict[str, Any]:
    """Parse the TOML file: a regular file (or /dev/null) of at most 1 MiB, UTF-8, never a traceback."""
    where = f"config {_show(str(path))[1:-1]}"
    try:
        if str(path) == os.devnull:
            return {}
        # Never open a FIFO or a device: opening or reading one may block forever.
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES >> 10} KiB")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ConfigError(f"{where}: not a regular file")
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES >> 10} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    try:
        return _flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {' '.join(str(exc).split())}") from None
    except ValueError as exc:  # Python's int-string limit (4300 digits) and friends
        raise ConfigError(f"{where}: invalid TOML: {' '.join(str(exc).split())[:120]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid TOML: nested too deeply") from None


def _check_relations(cfg: Config) -> None:
    """Values that are fine alone but not together, or that would make the rules match nothing."""
    if cfg.daemon_min_interval > cfg.daemon_reconcile_interval:
        raise ConfigError(
            f"daemon.min_interval: {cfg.daemon_min_interval:g} s is above daemon.reconcile_interval "
            f"{cfg.daemon_reconcile_interval:g} s"
        )
    for name in cfg.egress_interfaces:
        hit = next((p for p in cfg.egress_exclude_interfaces if iface_matches(p, name)), None)
        if hit is not None:
            raise ConfigError(
                f"egress.interfaces: {name!r} is excluded by egress.exclude_interfaces {hit!r}: no rule could match it"
            )
    wanted = {4 if f is Family.IPV4 else 6 for f in cfg.families}
    for key, cidrs in (("egress.exclude_destinations", cfg.egress_exclude_destinations),
                       ("masquerade.sources", cfg.masquerade_sources),
                       ("masquerade.keep_destinations", cfg.masquerade_keep_destinations)):
        unused = {ipaddress.ip_network(c).version for c in cidrs} - wanted
        if unused:
            raise ConfigError(f"{key}: IPv{min(unused)} networks listed but families has no ipv{min(unused)}")
    if cfg.masquerade_keep_destinations and not cfg.masquerade_sources:
        raise ConfigError("masquerade.keep_destinations: listed but masquerade.sources is empty: nothing to keep "
                          "them from")


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config; ``path=None`` means the default path when it exists, else defaults."""
    env = os.environ if env is None else env
    if path is None and env.get("PORTGUARD_CONFIG"):
        path = Path(_text(env["PORTGUARD_CONFIG"], "PORTGUARD_CONFIG"))
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    raw: dict[str, tuple[Any, str]] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        for key, value in _read_file(path).items():
            if key not in KEYS:
                raise ConfigError(f"{_show(key)[1:-1]}: unknown key in {path}")
            raw[key] = (value, key)
    for name, value in env.items():
        if not name.startswith("PORTGUARD_") or name in _ENV_NOT_KEYS:
            continue
        if name not in _ENV_TO_KEY:
            raise ConfigError(f"{_show(name)[1:-1]}: unknown environment variable")
        raw[_ENV_TO_KEY[name]] = (value, name)
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = (value, "--" + key.replace("_", "-").replace("log.", "log-"))
    fields: dict[str, Any] = {"source": source}
    for key, (value, origin) in raw.items():
        attr, parse = KEYS[key]
        fields[attr] = parse(value, origin)
    cfg = Config(**fields)
    _check_relations(cfg)
    return cfg


def narrow_target_warning(cfg: Config) -> dict[str, Any] | None:
    """Fields for a warning when fewer target ports than matched ports are available."""
    if cfg.to_ports.size >= cfg.source_ports.size:
        return None
    return {
        "source_ports": str(cfg.source_ports),
        "to_ports": str(cfg.to_ports),
        "ratio": round(cfg.source_ports.size / cfg.to_ports.size, 2),
    }
