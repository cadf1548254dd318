"""The runtimes' readers: files and listings as the runtimes write them, in; inventory parts, out."""

from __future__ import annotations

import json
from typing import Any

from portguard.backends.foreign import ForeignNat, marks_in_chain, parse_save, uncovered
from portguard.inventory import Inventory, Network, Part
from portguard.rules import Family
from portguard.runtimes.cni import flannel_network, parse_conflist, parse_subnet_env
from portguard.runtimes.podman import default_network, parse_network

# As netavark 1.4 (Debian 12) writes /etc/containers/networks/NAME.json.
PODMAN_NET = {"name": "pgnet", "id": "a" * 64, "driver": "bridge", "network_interface": "podman1",
              "created": "2026-12-02T12:00:00Z", "subnets": [{"subnet": "10.89.0.0/24", "gateway": "10.89.0.1"},
                                                              {"subnet": "fd00:89::/64", "gateway": "fd00:89::1"}],
              "ipv6_enabled": True, "internal": False, "dns_enabled": True, "ipam_options": {"driver": "host-local"}}
FLANNEL_ENV = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
# As kubeadm's flannel manifest installs /etc/cni/net.d/10-flannel.conflist.
FLANNEL_CONFLIST = {"name": "cbr0", "cniVersion": "0.3.1", "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}
BRIDGE_CONFLIST = {"cniVersion": "1.0.0", "name": "mynet", "plugins": [
    {"type": "bridge", "bridge": "cni-my0", "isGateway": True, "ipMasq": True,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.22.0.0/16"}]]}}]}


def test_a_podman_network_file_is_a_masqueraded_network_with_its_exceptions() -> None:
    """A managed, not internal netavark network: masqueraded, except towards its own subnets and multicast."""
    net = parse_network(PODMAN_NET)
    assert net is not None and net.bridge == "podman1" and net.masquerade and net.label == "podman:pgnet"
    assert net.subnets == ("10.89.0.0/24", "fd00:89::/64")
    assert net.keep_destinations == ("10.89.0.0/24", "fd00:89::/64", "224.0.0.0/4", "ff00::/8")


def test_internal_unmanaged_and_outbound_podman_networks() -> None:
    """internal and mode=unmanaged: not translated (bridge still known); outbound_addr4: SNAT to that address; a
    bridge name no backend represents alike: left out."""
    internal = parse_network({**PODMAN_NET, "internal": True})
    unmanaged = parse_network({**PODMAN_NET, "options": {"mode": "unmanaged"}})
    outbound = parse_network({**PODMAN_NET, "options": {"outbound_addr4": "198.51.100.32"}})
    assert internal is not None and not internal.translates(4) and internal.bridge == "podman1"
    assert unmanaged is not None and not unmanaged.translates(4)
    assert outbound is not None and outbound.nat_address(4) == "198.51.100.32" and outbound.nat_address(6) is None
    assert parse_network({**PODMAN_NET, "network_interface": 'x"y'}) is None
    assert parse_network({**PODMAN_NET, "driver": "macvlan"}) is None


def test_podmans_default_network_follows_containers_conf() -> None:
    """The in-memory default network: podman on podman0 10.88.0.0/16, or what containers.conf names."""
    default = default_network({})
    assert (default.name, default.bridge, default.subnets) == ("podman", "podman0", ("10.88.0.0/16",))
    custom = default_network({"default_network": "mine", "default_subnet": "10.99.0.0/16"})
    assert (custom.name, custom.subnets) == ("mine", ("10.99.0.0/16",))


def test_flannel_subnet_env_is_the_cluster_masqueraded_except_inside_it() -> None:
    """FLANNEL_IPMASQ=true: the cluster CIDR is masqueraded except towards itself and multicast; false: nothing."""
    env = parse_subnet_env(FLANNEL_ENV)
    net = flannel_network(env)
    assert net is not None and net.subnets == ("10.244.0.0/16",) and net.masquerade
    assert net.keep_destinations == ("10.244.0.0/16", "224.0.0.0/4")
    quiet = flannel_network({**env, "FLANNEL_IPMASQ": "false"})
    assert quiet is not None and not quiet.masquerade


def test_conflists_give_their_bridges_and_masquerades() -> None:
    """flannel's conflist: the node's pod subnet on cni0, not masqueraded by the bridge (flannel does it); a bridge
    plugin with ipMasq: its subnet masqueraded, on its own bridge."""
    env = parse_subnet_env(FLANNEL_ENV)
    [flannel] = parse_conflist(FLANNEL_CONFLIST, env)
    assert (flannel.bridge, flannel.subnets, flannel.masquerade) == ("cni0", ("10.244.1.0/24",), False)
    [bridge] = parse_conflist(BRIDGE_CONFLIST, {})
    assert (bridge.bridge, bridge.subnets, bridge.masquerade) == ("cni-my0", ("10.22.0.0/16",), True)
    assert parse_conflist({"name": "x", "plugins": [{"type": "calico"}]}, {}) == []


def test_kube_proxys_mark_is_read_from_its_chain_as_libnftables_lists_it() -> None:
    """iptables-nft 1.8.9 stores `-m mark ! --mark 0x4000/0x4000` natively: the mask is kube-proxy's bit."""
    listing = json.loads('[{"chain": {"name": "KUBE-POSTROUTING"}}, {"rule": {"expr": [{"match": {"op": "!=", '
                         '"left": {"&": [{"meta": {"key": "mark"}}, 16384]}, "right": 16384}}, {"return": null}]}}]')
    assert marks_in_chain(listing) == [(0x4000, 0x4000)]
    assert marks_in_chain([{"rule": {"expr": [{"masquerade": None}]}}]) == []


def test_foreign_masquerades_are_found_with_their_sources_and_kube_proxys_chain_is_not() -> None:
    """A libvirt-shaped rule has its source; netavark's per-network chain takes the source it is entered with;
    kube-proxy's mark-gated chain and portguard's own rules are left out; uncovered keeps only what no known
    network covers."""
    save = "\n".join([
        "*nat",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        "-A POSTROUTING -s 192.168.122.0/24 ! -d 192.168.122.0/24 -j MASQUERADE",
        "-A POSTROUTING -s 10.88.0.0/16 -j NETAVARK-1D8721804F16F",
        "-A POSTROUTING -m comment --comment \"portguard:fa6c3af1\" -j PORTGUARD",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
        "-A NETAVARK-1D8721804F16F -d 10.88.0.0/16 -j ACCEPT",
        "-A NETAVARK-1D8721804F16F ! -d 224.0.0.0/4 -j MASQUERADE",
        "-A PORTGUARD -s 10.89.0.0/24 -m comment --comment \"portguard:12345678\" -j MASQUERADE",
        "COMMIT",
    ])
    found = parse_save(save, "iptables-nft nat", Family.IPV4)
    assert [(f.source, f.rule.split(" -j ")[0]) for f in found] == [
        ("192.168.122.0/24", "-A POSTROUTING -s 192.168.122.0/24 ! -d 192.168.122.0/24"),
        ("10.88.0.0/16", "-A NETAVARK-1D8721804F16F ! -d 224.0.0.0/4")]
    assert [f.source for f in uncovered(found, ["10.88.0.0/16"])] == ["192.168.122.0/24"]
    anywhere = ForeignNat("iptables-nft nat", "-A POSTROUTING -o eth0 -j MASQUERADE", None, Family.IPV4)
    into = ForeignNat("iptables-nft nat", "-A X ! -s 10.244.0.0/16 -d 10.244.0.0/16 -j MASQUERADE", None,
                      Family.IPV4, "10.244.0.0/16")
    assert uncovered([anywhere, into], ["10.244.0.0/16"]) == [anywhere]


def test_a_recorded_inventory_reads_back_the_same_and_drops_what_does_not_parse() -> None:
    """to_doc/from_doc round-trip; a bridge name that would become syntax, a bad CIDR or mark is dropped."""
    inv = Inventory.of({"podman": Part((Network("podman", "p", "podman0", ("10.88.0.0/16",), True,
                                                keep_destinations=("224.0.0.0/4",)),)),
                        "kube-proxy": Part(marks=((0x4000, 0x4000),))})
    assert Inventory.from_doc(json.loads(json.dumps(inv.to_doc()))) == inv
    hostile: dict[str, Any] = {"docker": {"networks": [
        {"runtime": "docker", "name": "x", "bridge": 'br"; flush ruleset', "subnets": ["10.1.0.0/16"]},
        {"runtime": "docker", "name": "y", "bridge": "br-y", "subnets": ["not a cidr", "10.2.0.0/16"],
         "masquerade": True, "host_ipv4": "nope"}], "marks": [[1, 0], [0x4000, 0x4000], "x"]}}
    part = Inventory.from_doc(hostile).part("docker")
    assert part is not None and [(n.name, n.subnets, n.host_ipv4) for n in part.networks] == [
        ("y", ("10.2.0.0/16",), None)]
    assert part.marks == ((0x4000, 0x4000),)


def test_the_audit_leaves_out_what_the_rules_leave_alone() -> None:
    """The audit's scope comes from the rules in force: every runtime's bridge and every excluded destination is
    out of it (the host talking to a pod through cni0 keeps its low port on purpose), the egress is in."""
    from portguard.audit import Scope
    from portguard.config import Config
    from portguard.desired import desired_rules

    cni = Part((Network("cni", "cbr0", "cni0", ("10.244.1.0/24",), False),))
    cfg = Config(egress_exclude_destinations=("192.0.2.0/24",))
    scope = Scope.of(cfg, desired_rules(cfg, Inventory.of({"cni": cni})))
    assert not scope.covers("cni0", "10.244.1.5") and not scope.covers("docker0", "172.17.0.2")
    assert not scope.covers("eth0", "192.0.2.10") and scope.covers("eth0", "198.51.100.2")
    assert not scope.covers(None, "198.51.100.2")
