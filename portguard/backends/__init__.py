"""Backends: the only modules that touch netfilter.  Each is imported lazily by name."""

from __future__ import annotations

from portguard.backends.base import Backend, Observation, RuleStatus, State, Watch
from portguard.config import BACKEND_NAMES
from portguard.errors import ConfigError

__all__ = ["BACKEND_NAMES", "Backend", "Observation", "RuleStatus", "State", "Watch", "make_backend"]


def make_backend(name: str, *, owner: bool = False) -> Backend:
    """Construct a backend by name; the optional libraries load only for the one chosen.

    ``owner``: the nftables backend creates its table with ``flags owner`` (``portguard run``).
    """
    if name == "nftables":
        from portguard.backends.nftables import NftablesBackend

        return NftablesBackend(owner=owner)
    if name == "iptables-nft":
        from portguard.backends.iptables_nft import IptablesNftBackend

        return IptablesNftBackend()
    if name == "iptables-legacy":
        from portguard.backends.iptables_legacy import IptablesLegacyBackend

        return IptablesLegacyBackend()
    raise ConfigError(f"backend: {name!r} is not one of {', '.join(BACKEND_NAMES)}")
