"""Real traffic through a stateless ACL decides: the connection must leave with a translated port."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import BACKENDS, apply
from netns import Netns
from topology import ACL_LOW, AclNetwork

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("backend", BACKENDS)
def test_acl_rejects_without_portguard_and_passes_after_apply(ns: Netns, acl: AclNetwork, backend: str) -> None:
    """A low source port is rejected by the ACL; after `portguard apply` the same connection gets through."""
    assert not acl.connect()
    apply(ns, backend)
    assert acl.connect()
    assert acl.ports and acl.ports[-1] >= ACL_LOW, acl.ports


def _xt_nft(ns: Netns) -> None:
    ns.run(["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE"])


def _xt_legacy(ns: Netns) -> None:
    ns.run(["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE"])


def _native(ns: Netns) -> None:
    ns.nft(
        "add table ip other; add chain ip other post { type nat hook postrouting priority srcnat; }; "
        "add rule ip other post masquerade"
    )


def _reregister(ns: Netns) -> None:
    """Re-create every other NAT table, so each is the most recently registered."""
    saved = ns.run(["iptables-nft-save"]).stdout
    ns.nft("delete table ip nat; delete table ip other")
    ns.run(["iptables-nft-restore"], input=saved)
    _native(ns)
    legacy = ns.run(["iptables-legacy-save"]).stdout
    ns.run(["iptables-legacy", "-t", "nat", "-F"])
    ns.run(["iptables-legacy-restore"], input=legacy)


ORDERS: dict[str, list[Callable[[Netns], None] | str]] = {
    "others-first": [_xt_nft, _xt_legacy, _native, "apply"],
    "portguard-first": ["apply", _native, _xt_legacy, _xt_nft],
    "interleaved": [_xt_legacy, "apply", _native, _xt_nft],
    "others-re-registered-after": [_xt_nft, _xt_legacy, _native, "apply", _reregister],
}


@pytest.mark.parametrize("order", ORDERS)
def test_nftables_chain_decides_before_every_other_masquerade(ns: Netns, acl: AclNetwork, order: str) -> None:
    """Plain MASQUERADEs in iptables-nft, iptables-legacy and a native nft srcnat chain, registered in any order
    relative to portguard's table, never win: the connection leaves with a port in the target range."""
    for step in ORDERS[order]:
        if step == "apply":
            apply(ns, "nftables")
        else:
            step(ns)  # type: ignore[operator]
    assert acl.connect()
    assert acl.ports[-1] >= ACL_LOW, acl.ports


def test_plain_masquerade_alone_keeps_the_low_port(ns: Netns, acl: AclNetwork) -> None:
    """Control: the competing MASQUERADEs by themselves don't translate the port, so the test above can fail."""
    _xt_nft(ns)
    _xt_legacy(ns)
    _native(ns)
    assert not acl.connect()
