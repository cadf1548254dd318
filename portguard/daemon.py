"""``portguard run``: placeholder until the daemon lands."""

from __future__ import annotations

from portguard.config import Config
from portguard.errors import FatalError
from portguard.logs import Logger


def run_daemon(cfg: Config, log: Logger, *, cleanup_on_exit: bool = False) -> int:
    raise FatalError("portguard run is not implemented yet")
