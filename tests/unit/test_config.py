"""Config: defaults, layering, and one clear line for every invalid value."""

from __future__ import annotations

from pathlib import Path

import pytest

from portguard.config import Config, load_config, narrow_target_warning
from portguard.desired import desired_rules
from portguard.errors import ConfigError
from portguard.rules import Action, Family, PortRange, Protocol


def _load(tmp_path: Path, text: str | None = None, env: dict[str, str] | None = None, **flags: str) -> Config:
    path = None
    if text is not None:
        path = tmp_path / "pg.toml"
        path.write_text(text)
    return load_config(path, env=env or {}, overrides=flags)


def test_defaults_translate_the_port_only(tmp_path: Path) -> None:
    """With no configuration, per family: in the early chain bridges and lo excluded and host TCP 32768-61000 gets a
    port-only SNAT to 49152-61000; in the late chain the same exclusions and a port-only SNAT of what nobody else
    translated; IPv4 and IPv6 both."""
    cfg = _load(tmp_path)
    assert cfg.source_ports == PortRange(32768, 61000) and cfg.to_ports == PortRange(49152, 61000)
    rules = desired_rules(cfg)
    assert [(r.family, r.action, r.late) for r in rules] == [
        (f, a, late) for f in (Family.IPV4, Family.IPV6) for late in (False, True)
        for a in [Action.RETURN] * 3 + [Action.SNAT]
    ]
    assert [r.out_interface for r in rules[:3]] == ["lo", "docker0", "br-+"]
    host, forwarded = rules[3], rules[7]
    assert host.local_source and host.port_only and host.protocol is Protocol.TCP and not host.late
    assert forwarded.late and forwarded.port_only and not forwarded.local_source
    assert forwarded.to_ports == PortRange(49152, 61000) and forwarded.name == "ipv4/tcp/forwarded"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    """Environment overrides the file and flags override both."""
    cfg = _load(
        tmp_path,
        'backend = "iptables-nft"\nto_ports = "50000-60000"\n',
        env={"PORTGUARD_BACKEND": "iptables-legacy", "PORTGUARD_PROTOCOLS": "tcp,udp"},
        backend="nftables",
    )
    assert cfg.backend == "nftables"
    assert cfg.to_ports == PortRange(50000, 60000)
    assert cfg.protocols == (Protocol.TCP, Protocol.UDP)


def test_sections_and_lists(tmp_path: Path) -> None:
    """Egress scope, families and daemon settings come from their sections; rules multiply per family."""
    cfg = _load(
        tmp_path,
        'families = ["ipv4", "ipv6"]\n[egress]\ninterfaces = ["eth0", "ens+"]\n'
        "exclude_interfaces = []\n[daemon]\nreconcile_interval = 5\nconntrack_heal = false\n",
    )
    assert cfg.daemon_reconcile_interval == 5.0 and cfg.daemon_conntrack_heal is False
    rules = desired_rules(cfg)
    assert {(r.family, r.out_interface) for r in rules} == {
        (f, i) for f in (Family.IPV4, Family.IPV6) for i in ("eth0", "ens+")
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('source_ports = "0-100"', "source_ports: port 0 is outside 1-65535"),
        ('to_ports = "49152-70000"', "to_ports: port 70000 is outside 1-65535"),
        ('to_ports = "61000-49152"', "to_ports: low port 61000 is above high port 49152"),
        ('to_ports = "lots"', "to_ports: expected a port range"),
        ('protocols = ["sctp"]', "protocols: 'sctp' is not one of tcp, udp"),
        ("protocols = []", "protocols: must name at least one"),
        ('families = ["ipx"]', "families: 'ipx' is not one of ipv4, ipv6"),
        ('[egress]\nexclude_interfaces = ["averyveryverylongname"]', "longer than 15 bytes"),
        ('[egress]\ninterfaces = ["eth/0"]', "contains '/', ':', whitespace"),
        ('[egress]\ninterfaces = ["eth 0"]', "contains '/', ':', whitespace"),
        ('[egress]\ninterfaces = ["e+th"]', "a wildcard other than a trailing '+'"),
        ('[egress]\ninterfaces = [""]', "'' is empty"),
        ("colour = 1", "colour: unknown key"),
        ("[daemon]\nnap = 1", "daemon.nap: unknown key"),
        ("[daemon]\nreconcile_interval = -1", "daemon.reconcile_interval: expected 1 to 86400 seconds"),
        ('backend = "pf"', "backend: 'pf' is not one of"),
        ('[metrics]\nlisten = "nowhere"', "metrics.listen: expected IP:PORT"),
        ("to_ports = [", "invalid TOML"),
    ],
)
def test_every_bad_value_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    """Each invalid value raises ConfigError with a single line that names the key and the problem."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text + "\n")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_environment_variable_is_an_error(tmp_path: Path) -> None:
    """A misspelt PORTGUARD_* variable is reported, not silently ignored."""
    with pytest.raises(ConfigError, match="PORTGUARD_TO_PORT: unknown environment variable"):
        _load(tmp_path, env={"PORTGUARD_TO_PORT": "1-2"})


def test_trailing_plus_wildcard_is_allowed(tmp_path: Path) -> None:
    """'br-+' is the wildcard for every Docker bridge."""
    assert _load(tmp_path, '[egress]\nexclude_interfaces = ["br-+", "veth+"]\n').egress_exclude_interfaces == (
        "br-+",
        "veth+",
    )


def test_narrow_target_range_gives_the_ratio(tmp_path: Path) -> None:
    """A target range narrower than the matched range is allowed, with the ratio for the warning."""
    assert narrow_target_warning(_load(tmp_path, 'source_ports = "1000-1999"\nto_ports = "50000-50499"\n')) == {
        "source_ports": "1000-1999",
        "to_ports": "50000-50499",
        "ratio": 2.0,
    }
    assert narrow_target_warning(_load(tmp_path, 'source_ports = "50000-50099"\n')) is None


def test_desired_rules_follow_the_runtimes_inventory() -> None:
    """Each network its runtime translates gets that translation with the port moved (masquerade, or SNAT to
    host_ipv4), after its runtime's own exceptions; a network its runtime does not NAT gets no early rule (the late
    chain moves its port); every runtime's bridge is excluded like docker0; kube-proxy's mark is masqueraded
    before anything else decides."""
    from portguard.inventory import Inventory, Network, Part

    docker = Part((
        Network("docker", "bridge", "docker0", ("172.17.0.0/16",), True),
        Network("docker", "snat", "br-bbbbbbbbbbbb", ("10.76.0.0/24",), True, host_ipv4="198.51.100.32"),
        Network("docker", "plain", "mybr0", ("10.77.0.0/24", "fd00:7::/64"), False),
    ))
    podman = Part((Network("podman", "podman", "podman0", ("10.88.0.0/16",), True,
                           keep_destinations=("10.88.0.0/16", "224.0.0.0/4")),))
    kube = Part(marks=((0x4000, 0x4000),))
    rules = desired_rules(Config(), Inventory.of({"docker": docker, "podman": podman, "kube-proxy": kube}))
    early = [r for r in rules if r.family is Family.IPV4 and not r.late]
    assert [r.out_interface for r in early if r.out_interface] == ["lo", "docker0", "br-+", "mybr0", "podman0"]
    translations = [(r.label, r.action, r.source, r.to_address, r.fwmark) for r in early
                    if r.action is not Action.RETURN]
    assert translations == [
        ("kube-proxy", Action.MASQUERADE, None, None, (0x4000, 0x4000)),
        ("host", Action.SNAT, None, None, None),
        ("net:bridge", Action.MASQUERADE, "172.17.0.0/16", None, None),
        ("net:snat", Action.SNAT, "10.76.0.0/24", "198.51.100.32", None),
        ("podman:podman", Action.MASQUERADE, "10.88.0.0/16", None, None),
    ]
    keeps = [(r.source, r.destination) for r in early if r.action is Action.RETURN and r.source]
    assert keeps == [("10.88.0.0/16", "10.88.0.0/16"), ("10.88.0.0/16", "224.0.0.0/4")]
    assert early.index(next(r for r in early if r.source and r.action is Action.RETURN)) < early.index(
        next(r for r in early if r.label == "podman:podman" and r.action is Action.MASQUERADE))
    assert not any(r.source in {"10.77.0.0/24", "fd00:7::/64"} for r in rules)
    assert [r.label for r in rules if r.late and r.action is Action.SNAT] == ["forwarded", "forwarded"]


def test_operator_masquerade_and_a_discovered_network_alike_give_one_rule_each() -> None:
    """[masquerade] sources equal to flannel's cluster CIDR: the same rules, kept once, in the first one's place."""
    from portguard.inventory import Inventory, Network, Part

    cfg = Config(masquerade_sources=("10.244.0.0/16",), masquerade_keep_destinations=("10.244.0.0/16",))
    flannel = Network("flannel", "cluster", "", ("10.244.0.0/16",), True,
                      keep_destinations=("10.244.0.0/16", "224.0.0.0/4"))
    rules = desired_rules(cfg, Inventory.of({"cni": Part((flannel,))}), [Family.IPV4])
    assert len(rules) == len(set(rules))
    assert [(r.action, r.destination) for r in rules if r.source == "10.244.0.0/16"] == [
        (Action.RETURN, "10.244.0.0/16"), (Action.RETURN, "224.0.0.0/4"), (Action.MASQUERADE, None)]


def test_the_example_config_lists_every_key_with_its_default() -> None:
    """systemd/portguard.toml (installed as /etc/portguard/portguard.toml) names every key, each at its default."""
    import tomllib

    from portguard.config import KEYS, _flatten

    example = Path(__file__).resolve().parents[2] / "systemd" / "portguard.toml"
    assert set(_flatten(tomllib.loads(example.read_text()))) == set(KEYS)
    assert load_config(example, env={}) == Config()
