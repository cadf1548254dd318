"""portguard keeps a source-port NAT rule present, exactly once, and effective."""

__all__ = ["__version__"]

__version__ = "0.2.0"
