"""Backend selection: auto's order, fallbacks with reasons, and the forced-flavour conflict."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from portguard.backends import Backend, Observation
from portguard.detect import select_backend
from portguard.errors import FatalError
from portguard.rules import Rule


class _Fake:
    def __init__(self, name: str, usable: bool) -> None:
        self.name, self.usable = name, usable

    def probe(self) -> None:
        if not self.usable:
            raise FatalError(f"backend {self.name}: missing; install it")

    def render(self, rules: Sequence[Rule]) -> str:
        return ""

    def observe(self, rules: Sequence[Rule]) -> Observation:
        return Observation(self.name, ())

    def ensure(self, rules: Sequence[Rule], seen: Observation | None = None) -> None:
        return None

    def remove(self) -> int:
        return 0


def _factory(usable: set[str]):  # type: ignore[no-untyped-def]
    def make(name: str) -> Backend:
        return _Fake(name, name in usable)

    return make


def _select(requested: str, usable: set[str], flavour: str | None) -> object:
    return select_backend(requested, flavour_of_docker=lambda: flavour, firewall_of_docker=lambda _h: None,
                          factory=_factory(usable))


def test_auto_prefers_nftables_without_asking_for_dockers_flavour() -> None:
    """auto takes nftables when usable and never probes Docker's flavour for it."""
    def boom() -> str | None:
        raise AssertionError("flavour probed")

    sel = select_backend("auto", flavour_of_docker=boom, firewall_of_docker=lambda _h: None,
                         factory=_factory({"nftables", "iptables-nft"}))
    assert sel.backend.name == "nftables" and sel.conflicts == ()


def test_auto_falls_back_to_dockers_flavour_and_says_why() -> None:
    """Without nftables, auto follows Docker's flavour even when another one is usable too."""
    sel = _select("auto", {"iptables-nft", "iptables-legacy"}, "legacy")
    assert sel.backend.name == "iptables-legacy"  # type: ignore[attr-defined]
    assert sel.skipped == ("backend nftables: missing; install it",)  # type: ignore[attr-defined]


def test_auto_with_nothing_usable_is_one_fatal_error_listing_every_reason() -> None:
    """No usable backend: a fatal error naming what to install for each."""
    with pytest.raises(FatalError, match="no usable backend: backend nftables: missing"):
        _select("auto", set(), None)


def test_forcing_another_flavour_than_dockers_is_a_conflict() -> None:
    """A forced iptables flavour that differs from Docker's is reported as a conflict (drift in check)."""
    sel = _select("iptables-nft", {"iptables-nft"}, "legacy")
    assert sel.conflicts and "Docker writes iptables-legacy" in sel.conflicts[0]  # type: ignore[attr-defined]
    assert _select("iptables-nft", {"iptables-nft"}, "nft").conflicts == ()  # type: ignore[attr-defined]


def test_forced_unusable_backend_is_fatal() -> None:
    """A forced backend whose tools are missing does not silently fall back."""
    with pytest.raises(FatalError, match="install it"):
        _select("iptables-legacy", {"nftables"}, None)
