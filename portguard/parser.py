"""The one argparse parser: the CLI parses with it, completion and the man page are generated from it.

Standard library and portguard's own pure modules only, so that the man page can be generated while
the package is built (setup.py), before any dependency is installed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from portguard import __version__
from portguard.config import BACKENDS, LOG_FORMATS, LOG_LEVELS

__all__ = ["COMMANDS", "EXIT_DRIFT", "EXIT_ERROR", "EXIT_OK", "SHELLS", "UsageError", "build_parser"]

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2
SHELLS = ("bash", "zsh", "fish")
COMMANDS = {
    "apply": "one full sync: make the kernel tables match the config, then verify",
    "check": "read-only: report each rule as healthy/absent/shadowed/duplicated/misordered/dormant",
    "remove": "delete everything portguard owns, nothing else",
    "render": "print what apply would install, in the backend's own syntax",
    "run": "the daemon: keep the rules healthy whatever Docker and others do",
    "doctor": "explain whether this host is protected, and why not",
    "demo": "show the problem and the fix live, in throwaway network namespaces",
    "reload": "make the running daemon re-read its config and say whether it took it (systemctl reload runs it)",
    "install-systemd": "install the systemd unit and an example config",
    "completion": "print the shell completion script for bash, zsh or fish",
}
JSON_COMMANDS = ("apply", "check", "remove", "render", "doctor", "demo", "reload")


class UsageError(Exception):
    """The command line cannot be parsed; the message is one line (the CLI prints it, and JSON under --json)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(" ".join(message.split()))


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--version", action="version", version=f"portguard {__version__}")
    parser.add_argument("--config", type=Path, default=default, metavar="PATH",
                        help="TOML config (default /etc/portguard/portguard.toml when it exists)")
    parser.add_argument("--backend", choices=BACKENDS, default=default, help="netfilter backend (default auto)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=default,
                        help="default auto: JSON unless a terminal")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default, help="default info")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="portguard", description="Keep source ports inside a stateless ACL's range on Docker "
                     "hosts: translate the port, never the address.",
                     epilog="Exit status: 0 fine, 1 drift or risks (check, doctor, apply --dry-run: changes "
                     "pending), 2 error. Logs go to stderr (run: stdout); --json documents to stdout.")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _global_options(p, suppress=True)
        if name in JSON_COMMANDS:
            p.add_argument("--json", action="store_true", help="one JSON document on stdout (shape in the README)")
        if name == "apply":
            p.add_argument("--dry-run", action="store_true",
                           help="read the kernel, print what would be added, replaced and removed, write nothing "
                                "(exit 0 nothing to do, 1 something would change)")
        if name == "run":
            p.add_argument("--cleanup-on-exit", action="store_true", help="remove the rules on SIGTERM/SIGINT")
        if name == "reload":
            p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                           help="how long to wait for the daemon's answer (default 30)")
        if name == "install-systemd":
            p.add_argument("--root", type=Path, default=Path("/"), help="install below this directory")
            p.add_argument("--exec", dest="exec_path", default=None,
                           help="the program the unit runs (default: this portguard)")
            p.add_argument("--force", action="store_true", help="replace a unit that was edited")
        if name == "completion":
            p.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    return parser
