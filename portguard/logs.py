"""structlog set-up: JSON when the stream is not a terminal, console output when it is, and syslog priority
prefixes under journald.

Under journald (``JOURNAL_STREAM`` set, sd-daemon(3)) each line starts with ``<N>``, its syslog priority
(``<2>`` critical, ``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug), which journald strips and
stores, so ``journalctl -u portguard -p warning`` filters by level.  Elsewhere lines are plain.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

__all__ = ["Logger", "configure_logging"]

Logger = Any  # structlog's BoundLogger is dynamically typed
PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


class _JournalPrefix:
    """Wraps the final renderer: ``<N>`` before every line, N the syslog priority of the event's level."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event_dict: Any) -> str:
        level = str(event_dict.get("level", name))
        return f"<{PRIORITY.get(level, 6)}>{self._renderer(logger, name, event_dict)}"


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None,
                      env: Mapping[str, str] | None = None) -> Logger:
    stream = stream or sys.stderr
    env = os.environ if env is None else env
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback)
    )
    if env.get("JOURNAL_STREAM"):
        renderer = _JournalPrefix(renderer)
    # One write per line (message and newline together), and the stream's lock created here, before any
    # worker thread logs: structlog 26.1 creates that lock lazily without a lock of its own, so the first
    # concurrent log calls could each get a different one and interleave their lines.
    factory = structlog.WriteLoggerFactory(stream)
    factory()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger("portguard")
