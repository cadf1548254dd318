"""What leaves the host, as the far side sees it (address and port), through an ACL that rejects source ports
below 49152: portguard moves the port and changes no address that the host (a runtime, the operator) would not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BACKENDS, apply
from netns import Netns
from topology import ACL_LOW, INNER_IP, INNER_NET, NEAR_IP, NEAR_IP6, OPEN_PORT, SECONDARY_IP, SERVER_IP6, AclNetwork

pytestmark = pytest.mark.netns


@pytest.fixture
def acl(ns: Netns) -> Iterator[AclNetwork]:
    net = AclNetwork(ns, inner=True)
    try:
        yield net
    finally:
        net.close()


def _apply(ns: Netns, backend: str, *extra: str) -> None:
    if backend == "iptables-legacy":
        # A legacy host that uses IPv6 NAT already has the legacy ip6 nat table (Docker with ip6tables
        # registers it); portguard never registers one itself.
        ns.run(["ip6tables-legacy", "-t", "nat", "-S", "POSTROUTING"])
    apply(ns, backend, *extra)


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_traffic_keeps_its_address_and_gets_a_high_port(ns: Netns, acl: AclNetwork, backend: str) -> None:
    """Host connections from the primary and from a secondary address keep that address; both leave with a port in
    the ACL's range (a plain MASQUERADE would rewrite the secondary address to the primary)."""
    assert not acl.connect(source=SECONDARY_IP)  # control: rejected without portguard
    _apply(ns, backend)
    assert acl.connect(source=SECONDARY_IP)
    assert acl.connect(source=NEAR_IP)
    (addr2, port2), (addr1, port1) = acl.peers[-2:]
    assert (addr2, addr1) == (SECONDARY_IP, NEAR_IP), acl.peers
    assert port2 >= ACL_LOW and port1 >= ACL_LOW, acl.peers


@pytest.mark.parametrize("backend", BACKENDS)
def test_routed_traffic_keeps_its_address_and_gets_a_high_port(ns: Netns, acl: AclNetwork, backend: str) -> None:
    """A router: a connection from a LAN namespace behind the host, which nothing on the host translates, leaves
    with its own address (the far side routes back to the LAN) and a port in the ACL's range."""
    assert acl.inner is not None
    acl.far.run(["ip", "route", "add", INNER_NET, "via", NEAR_IP])
    assert not acl.connect(via=acl.inner)  # control: routed untranslated, its low port is rejected
    _apply(ns, backend)
    assert acl.connect(via=acl.inner)
    addr, port = acl.peers[-1]
    assert addr == INNER_IP and port >= ACL_LOW, acl.peers


@pytest.mark.parametrize("backend", BACKENDS)
def test_traffic_another_rule_masquerades_keeps_that_translation(ns: Netns, acl: AclNetwork, backend: str) -> None:
    """A masquerade portguard does not know (no route back to the LAN): the late chain never overrides it, so the
    connection leaves masqueraded, as the host asked, with its original, rejected port; named as uncovered."""
    assert acl.inner is not None
    xt = "iptables-legacy" if backend == "iptables-legacy" else "iptables-nft"
    ns.run([xt, "-t", "nat", "-A", "POSTROUTING", "-s", INNER_NET, "!", "-d", INNER_NET, "-j", "MASQUERADE"])
    _apply(ns, backend)
    assert acl.connect(port=OPEN_PORT, via=acl.inner)
    addr, port = acl.open_peers[-1]
    assert addr == NEAR_IP and port < ACL_LOW, acl.open_peers


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_host_traffic_gets_a_high_port_with_its_own_address(ns: Netns, acl: AclNetwork, backend: str) -> None:
    """IPv6 is translated by default: the far side sees the host's own IPv6 address and a high port."""
    assert not acl.connect(server=SERVER_IP6)
    _apply(ns, backend)
    assert acl.connect(server=SERVER_IP6)
    addr, port = acl.peers[-1]
    assert addr == NEAR_IP6 and port >= ACL_LOW, acl.peers


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluded_destination_sees_the_original_port(ns: Netns, acl: AclNetwork, backend: str, tmp_path: Path) -> None:
    """egress.exclude_destinations: connections to it keep their port and address; others are still translated."""
    cfg = tmp_path / "pg.toml"
    cfg.write_text('[egress]\nexclude_destinations = ["198.51.100.2/32", "2001:db8:ffff::/48"]\n')
    _apply(ns, backend, "--config", str(cfg))
    assert acl.connect(port=OPEN_PORT, source=SECONDARY_IP)
    addr, port = acl.open_peers[-1]
    assert addr == SECONDARY_IP and port < ACL_LOW, acl.open_peers
    assert not acl.connect()  # the same destination behind the ACL: the original port is rejected
    assert acl.connect(server=SERVER_IP6)  # IPv6 destination not excluded: translated
    assert acl.peers[-1][1] >= ACL_LOW, acl.peers


def test_a_masquerade_portguard_does_not_know_is_named_by_doctor_and_covered_by_config(ns: Netns, acl: AclNetwork,
                                                                                     tmp_path: Path) -> None:
    """A libvirt-shaped network (`-s NET ! -d NET -j MASQUERADE`): doctor exits 1 naming its subnet and the
    configuration that covers it, and its audit counts the flow that left untranslated; with that configuration
    the network's traffic leaves masqueraded, as the host asks, with a high port."""
    assert acl.inner is not None
    ns.run(["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", INNER_NET, "!", "-d", INNER_NET, "-j",
            "MASQUERADE"])
    _apply(ns, "nftables")
    assert acl.connect(port=OPEN_PORT, via=acl.inner) and acl.open_peers[-1][1] < ACL_LOW
    doctor = ns.portguard("doctor", "--json", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    report = json.loads(doctor.stdout)
    risks = [f["message"] for f in report["findings"] if f["severity"] == "risk"]
    assert doctor.returncode == 1 and any(
        INNER_NET in m and f'[masquerade] sources = ["{INNER_NET}"]' in m for m in risks), risks
    assert report["facts"]["untranslated_flows"] >= 1, report["facts"]
    cfg = tmp_path / "pg.toml"
    cfg.write_text(f'[masquerade]\nsources = ["{INNER_NET}"]\nkeep_destinations = ["{INNER_NET}"]\n')
    _apply(ns, "nftables", "--config", str(cfg))
    assert acl.connect(via=acl.inner)
    addr, port = acl.peers[-1]
    assert addr == NEAR_IP and port >= ACL_LOW, acl.peers
