"""The two kinds of failure: worth retrying, or not."""

from __future__ import annotations

__all__ = ["ConfigError", "FatalError", "PortguardError", "RetryableError"]


class PortguardError(Exception):
    """Base of every error portguard reports as one line."""


class RetryableError(PortguardError):
    """Transient: the xtables lock is busy, the table changed under us, dockerd is away."""


class FatalError(PortguardError):
    """Retrying will not help: a backend is unusable, the kernel refused the rules."""


class ConfigError(FatalError):
    """A configuration value is invalid; the message names the key."""
