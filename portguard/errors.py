"""The kinds of failure: worth retrying, fatal, or beyond any write of portguard's."""

from __future__ import annotations

__all__ = ["ConfigError", "FatalError", "PortguardError", "RetryableError", "UnfixableError"]


class PortguardError(Exception):
    """Base of every error portguard reports as one line."""


class RetryableError(PortguardError):
    """Transient: the xtables lock is busy, the table changed under us, dockerd is away."""


class FatalError(PortguardError):
    """Retrying will not help: a backend is unusable, the kernel refused the rules."""


class ConfigError(FatalError):
    """A configuration value is invalid; the message names the key."""


class UnfixableError(PortguardError):
    """No write of portguard's can fix it (the kernel refuses: another process owns the object, a foreign
    rule iptables-nft cannot read): report it, keep enforcing everything else, never retry in a loop."""
