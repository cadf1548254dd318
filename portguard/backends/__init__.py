"""Backends: the only modules that touch netfilter.  Each is imported lazily by name."""

from __future__ import annotations

from portguard.backends.base import Backend, Observation, RuleStatus, State
from portguard.errors import ConfigError

__all__ = ["Backend", "Observation", "RuleStatus", "State", "make_backend"]


def make_backend(name: str) -> Backend:
    """Construct a backend by name; the optional libraries load only for the one chosen."""
    if name == "nftables":
        from portguard.backends.nftables import NftablesBackend

        return NftablesBackend()
    if name == "iptables-nft":
        from portguard.backends.iptables_nft import IptablesNftBackend

        return IptablesNftBackend()
    if name == "iptables-legacy":
        from portguard.backends.iptables_legacy import IptablesLegacyBackend

        return IptablesLegacyBackend()
    raise ConfigError(f"backend: {name!r} is not one of nftables, iptables-nft, iptables-legacy")
