"""Bad input from files, environment variables, flags and paths: one line on stderr, exit 2, no traceback, no
hang, and the namespace's nft and xtables state byte-for-byte what it was, for every command that reads config."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import apply
from netns import Netns

pytestmark = pytest.mark.netns

BIG = "1" * 5000
# (case id, TOML text) — each written to a file and passed with --config.
FILES: list[tuple[str, str]] = [
    ("injection-quote", '[egress]\nexclude_interfaces = ["lo", "a\\";drop#"]'),
    ("quote", '[egress]\ninterfaces = ["a\\"b"]'),
    ("backslash", '[egress]\ninterfaces = ["a\\\\b"]'),
    ("single-quote", '[egress]\ninterfaces = ["a\'b"]'),
    ("bang-prefix", '[egress]\nexclude_interfaces = ["!eth0"]'),
    ("bare-bang", '[egress]\nexclude_interfaces = ["!"]'),
    ("plus-only", '[egress]\nexclude_interfaces = ["+"]'),
    ("excluded-by-wildcard", '[egress]\ninterfaces = ["eth0"]\nexclude_interfaces = ["eth+"]'),
    ("excluded-exactly", '[egress]\ninterfaces = ["eth0"]\nexclude_interfaces = ["eth0"]'),
    ("at-set", '[egress]\ninterfaces = ["@set"]'),
    ("dollar-var", '[egress]\ninterfaces = ["$var"]'),
    ("star", '[egress]\ninterfaces = ["eth*"]'),
    ("inner-plus", '[egress]\ninterfaces = ["e+th"]'),
    ("question", '[egress]\ninterfaces = ["eth?"]'),
    ("newline-in-name", '[egress]\ninterfaces = ["eth0\\n"]'),
    ("nul-in-name", '[egress]\ninterfaces = ["eth\\u0000"]'),
    ("empty-name", '[egress]\ninterfaces = [""]'),
    ("long-name", '[egress]\ninterfaces = ["averyveryverylongname"]'),
    ("slash", '[egress]\ninterfaces = ["a/b"]'),
    ("colon", '[egress]\ninterfaces = ["a:b"]'),
    ("space", '[egress]\ninterfaces = ["a b"]'),
    ("dup-iface", '[egress]\nexclude_interfaces = ["lo", "lo"]'),
    ("dup-protocols-case", 'protocols = ["tcp", "TCP"]'),
    ("dup-families-case", 'families = ["ipv4", "IPv4"]'),
    ("huge-int-port", f"source_ports = {BIG}"),
    ("huge-digits-range", 'to_ports = "99999999999999999999-1"'),
    ("port-zero", 'source_ports = "0-100"'),
    ("port-reversed", 'to_ports = "61000-49152"'),
    ("port-word", 'to_ports = "lots"'),
    ("port-float", "to_ports = 4.5"),
    ("interval-1e308", "[daemon]\nreconcile_interval = 1e308"),
    ("audit-1e308", "[daemon]\naudit_interval = 1e308"),
    ("poll-1e-9", "[daemon]\npoll_interval = 1e-9"),
    ("min-above-reconcile", "[daemon]\nmin_interval = 50\nreconcile_interval = 30"),
    ("interval-nan", "[daemon]\nreconcile_interval = nan"),
    ("interval-inf", "[daemon]\nreconcile_interval = inf"),
    ("interval-word", '[daemon]\nreconcile_interval = "soon"'),
    ("interval-bool", "[daemon]\nreconcile_interval = true"),
    ("interval-huge-int", f"[daemon]\nmax_backoff = {BIG}"),
    ("storm-zero", "[daemon]\nstorm_repairs = 0"),
    ("storm-huge", f"[daemon]\nstorm_repairs = {BIG}"),
    ("heal-word", '[daemon]\nconntrack_heal = "maybe"'),
    ("listen-bad-octet", '[metrics]\nlisten = "256.1.1.1:9640"'),
    ("listen-port-zero", '[metrics]\nlisten = "127.0.0.1:0"'),
    ("listen-port-big", '[metrics]\nlisten = "127.0.0.1:99999"'),
    ("listen-hostname", '[metrics]\nlisten = "localhost:9640"'),
    ("listen-v6-unbracketed", '[metrics]\nlisten = "::1:9640"'),
    ("listen-no-port", '[metrics]\nlisten = "127.0.0.1"'),
    ("cidr-33", '[egress]\nexclude_destinations = ["10.0.0.0/33"]'),
    ("cidr-word", '[egress]\nexclude_destinations = ["not-a-net"]'),
    ("cidr-everything", '[egress]\nexclude_destinations = ["0.0.0.0/0"]'),
    ("cidr-v6-without-family", 'families = ["ipv4"]\n[egress]\nexclude_destinations = ["2001:db8::/32"]'),
    ("cidr-dup", '[egress]\nexclude_destinations = ["10.0.0.0/8", "10.0.0.1/8"]'),
    ("cidr-not-list", "[egress]\nexclude_destinations = 10"),
    ("fully-random-word", 'fully_random = "perhaps"'),
    ("fully-random-int", "fully_random = 2"),
    ("nested-arrays", "protocols = " + "[" * 20000 + "]" * 20000),
    ("list-of-lists", 'protocols = [["tcp"]]'),
    ("too-many-entries", "[egress]\nexclude_interfaces = [" + ", ".join(f'"x{i}"' for i in range(300)) + "]"),
    ("unknown-key", "colour = 1"),
    ("unknown-daemon-key", "[daemon]\nnap = 1"),
    ("unknown-subsection", "[egress.more]\nx = 1"),
    ("invalid-toml", "to_ports = ["),
    ("docker-host-bogus", '[docker]\nhost = "bogus"'),
    ("log-level", '[log]\nlevel = "loud"'),
    ("backend", 'backend = "pf"'),
    ("protocol-sctp", 'protocols = ["sctp"]'),
]
# (case id, environment) — on top of a valid (empty) config.
ENVS: list[tuple[str, dict[str, str]]] = [
    ("env-injection", {"PORTGUARD_EGRESS_EXCLUDE_INTERFACES": 'lo,a";drop#'}),
    ("env-interfaces-injection", {"PORTGUARD_EGRESS_INTERFACES": 'x";drop#'}),
    ("env-huge-port", {"PORTGUARD_SOURCE_PORTS": BIG}),
    ("env-huge-count", {"PORTGUARD_DAEMON_STORM_REPAIRS": BIG}),
    ("env-huge-float", {"PORTGUARD_DAEMON_RECONCILE_INTERVAL": BIG}),
    ("env-dup-families", {"PORTGUARD_FAMILIES": "ipv4,IPv4"}),
    ("env-unknown", {"PORTGUARD_COLOUR": "1"}),
    ("env-listen", {"PORTGUARD_METRICS_LISTEN": "256.1.1.1:9640"}),
    ("env-fully-random", {"PORTGUARD_FULLY_RANDOM": "perhaps"}),
    ("env-cidr", {"PORTGUARD_EGRESS_EXCLUDE_DESTINATIONS": "10.0.0.0/8,bogus"}),
    ("env-config-device", {"PORTGUARD_CONFIG": "/dev/zero"}),
    ("env-control-char", {"PORTGUARD_DOCKER_HOST": "unix:///x\x01"}),
]
FLAGS: list[tuple[str, list[str]]] = [
    ("flag-backend", ["--backend", "pf"]),
    ("flag-log-level", ["--log-level", "loud"]),
    ("flag-unknown", ["--frobnicate"]),
    ("flag-config-missing", ["--config", "/nonexistent/portguard.toml"]),
]


@pytest.fixture(scope="module")
def space() -> Iterator[Netns]:
    ns = Netns("pghost")
    try:
        apply(ns, "nftables")  # state to keep: portguard's own tables, and xtables rules of both flavours
        ns.run(["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "10.9.0.0/16", "-j", "MASQUERADE"])
        ns.run(["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "10.8.0.0/16", "-j", "MASQUERADE"])
        yield ns
    finally:
        ns.close()


def _state(ns: Netns) -> str:
    parts = [ns.nft("list", "ruleset")]
    for tool in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        parts.append(re.sub(r"^#.*$", "", ns.run([tool]).stdout, flags=re.M))
    parts.append(ns.run(["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]).stdout)
    return "\n".join(parts)


def _judge(ns: Netns, args: list[str], env: dict[str, str] | None = None) -> None:
    before = _state(ns)
    proc = ns.portguard(*args, env=env, timeout=20)  # a hang fails the test by timing out
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-500:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert len(proc.stderr) < 400, proc.stderr
    assert _state(ns) == before


@pytest.mark.parametrize(("case", "text"), FILES, ids=[c for c, _ in FILES])
@pytest.mark.parametrize("command", ["apply", "run"])
def test_bad_config_file(space: Netns, tmp_path: Path, case: str, text: str, command: str) -> None:
    """Every bad file: exit 2, one line, nothing written, for apply and for run alike."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text(text + "\n")
    _judge(space, [command, "--config", str(cfg)])


def test_config_that_is_not_utf8(space: Netns, tmp_path: Path) -> None:
    """A config file holding bytes that are not UTF-8."""
    cfg = tmp_path / "pg.toml"
    cfg.write_bytes(b'to_ports = "\xff\xfe"\n')
    _judge(space, ["apply", "--config", str(cfg)])


def test_config_that_is_too_large(space: Netns, tmp_path: Path) -> None:
    """A config file over the 1 MiB cap."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text("# " + "x" * (2 << 20) + "\n")
    _judge(space, ["apply", "--config", str(cfg)])


@pytest.mark.parametrize("kind", ["fifo", "char-device", "directory"])
def test_config_path_that_is_not_a_regular_file(space: Netns, tmp_path: Path, kind: str) -> None:
    """A FIFO (would block forever), a character device, a directory: refused without opening them for reading."""
    path = tmp_path / "pg.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path("/dev/zero")
    _judge(space, ["apply", "--config", str(path)])


@pytest.mark.parametrize(("case", "env"), ENVS, ids=[c for c, _ in ENVS])
def test_bad_environment(space: Netns, case: str, env: dict[str, str]) -> None:
    """Every bad PORTGUARD_* variable: exit 2, one line, nothing written."""
    _judge(space, ["apply"], env=env)


@pytest.mark.parametrize(("case", "flags"), FLAGS, ids=[c for c, _ in FLAGS])
def test_bad_flags(space: Netns, case: str, flags: list[str]) -> None:
    """Bad flags: exit 2, one line, nothing written."""
    _judge(space, ["apply", *flags])


def test_render_never_prints_injected_syntax(space: Netns, tmp_path: Path) -> None:
    """render refuses the injection too (it used to print it with exit 0)."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text('[egress]\nexclude_interfaces = ["lo", "a\\";drop#"]\n')
    _judge(space, ["render", "--backend", "nftables", "--config", str(cfg)])
