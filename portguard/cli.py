"""The ``portguard`` command: parses options, wires objects together, maps errors to exit codes.

This is the composition root: the only module that builds the config, the logger, the backend
and the reconciler and hands them to each other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from portguard import __version__
from portguard.backends import Observation, State
from portguard.config import BACKENDS, LOG_FORMATS, LOG_LEVELS, Config, load_config, narrow_target_warning
from portguard.desired import desired_rules
from portguard.errors import ConfigError, PortguardError
from portguard.logs import Logger, configure_logging

__all__ = ["main"]

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit 2, as for every other bad input
        sys.stderr.write(f"portguard: error: {message}\n")
        raise SystemExit(EXIT_ERROR)


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="PATH",
        help="TOML config (default /etc/portguard/portguard.toml when it exists)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default=default, help="netfilter backend (default auto)")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default=default, help="default auto: JSON unless a terminal"
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default, help="default info")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="portguard", description="Keep a source-port NAT rule present, once, and effective.")
    parser.add_argument("--version", action="version", version=f"portguard {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands = {
        "apply": "one full sync: make the kernel tables match the config, then verify",
        "check": "read-only: report each rule as healthy/absent/shadowed/duplicated",
        "remove": "delete everything portguard owns, nothing else",
        "render": "print what apply would install, in the backend's own syntax",
        "run": "the daemon: keep the rules healthy whatever Docker and others do",
        "doctor": "explain whether this host is protected, and why not",
        "demo": "show the problem and the fix live, in throwaway network namespaces",
        "install-systemd": "install the systemd unit and an example config",
    }
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _global_options(p, suppress=True)
        if name in ("check", "doctor", "demo"):
            p.add_argument("--json", action="store_true", help="machine-readable report")
        if name == "run":
            p.add_argument("--cleanup-on-exit", action="store_true", help="remove the rules on SIGTERM/SIGINT")
        if name == "install-systemd":
            p.add_argument("--root", type=Path, default=Path("/"), help="install below this directory")
            p.add_argument("--exec", dest="exec_path", default=None, help="ExecStart program (default: this portguard)")
            p.add_argument("--force", action="store_true", help="replace a unit that was edited")
    return parser


CAP_NET_ADMIN = 12
NEEDS_NET_ADMIN = ("apply", "check", "remove", "run", "doctor", "demo")


def has_net_admin(status: Path = Path("/proc/self/status")) -> bool:
    """Is CAP_NET_ADMIN in this process's effective set (root, or granted by systemd/docker)?"""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def _config(args: argparse.Namespace) -> Config:
    overrides = {"backend": args.backend, "log.format": args.log_format, "log.level": args.log_level}
    return load_config(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _config(args)
    except ConfigError as exc:
        sys.stderr.write(f"portguard: error: {exc}\n")
        return EXIT_ERROR
    if args.command in NEEDS_NET_ADMIN and not has_net_admin():
        sys.stderr.write(
            f"portguard: error: {args.command} needs CAP_NET_ADMIN to read netfilter tables; run it as root\n"
        )
        return EXIT_ERROR
    log = configure_logging(cfg.log_format, cfg.log_level, sys.stdout if args.command == "run" else sys.stderr)
    try:
        return _dispatch(args, cfg, log)
    except PortguardError as exc:
        sys.stderr.write(f"portguard: error: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback for the operator; the debug log keeps it
        log.debug("command.crashed", exc_info=True)
        sys.stderr.write(f"portguard: internal error: {type(exc).__name__}: {exc}\n")
        return EXIT_ERROR


def _dispatch(args: argparse.Namespace, cfg: Config, log: Logger) -> int:  # one return per command
    if args.command == "demo":
        from portguard.demo import run_demo

        return run_demo(as_json=args.json)
    if args.command == "install-systemd":
        from portguard.install import install_systemd

        for line in install_systemd(args.root, args.exec_path, force=args.force):
            print(line)
        return EXIT_OK
    warning = narrow_target_warning(cfg)
    if warning and args.command in ("apply", "run"):
        log.warning("config.narrow_target", **warning)
    if args.command == "doctor":
        from portguard.doctor import render, run_doctor

        diagnosis = run_doctor(cfg, _networks(cfg))
        print(render(diagnosis, as_json=args.json))
        return EXIT_DRIFT if diagnosis.risks else EXIT_OK
    if args.command == "run":
        from portguard.daemon import run_daemon

        return run_daemon(cfg, log, cleanup_on_exit=args.cleanup_on_exit, reload_config=lambda: _config(args))
    return _netfilter_command(args, cfg, log)


def _netfilter_command(args: argparse.Namespace, cfg: Config, log: Logger) -> int:
    """apply, check, remove and render: one backend, the desired rules, one reconciler."""
    from portguard.detect import select_backend
    from portguard.reconciler import Reconciler

    networks = _networks(cfg)
    if args.command == "render" and cfg.backend != "auto":
        from portguard.backends import make_backend

        print(make_backend(cfg.backend).render(desired_rules(cfg, networks)), end="")
        return EXIT_OK
    selection = select_backend(cfg.backend, docker_host=cfg.docker_host)
    for why in selection.skipped:
        log.info("backend.skipped", reason=why)
    log.debug("backend.selected", backend=selection.backend.name, reason=selection.reason)
    backend = selection.backend
    families = [f for f in cfg.families if f in backend.families()] if args.command != "render" else cfg.families
    for missing in (f for f in cfg.families if f not in families):
        log.warning("family.unavailable", family=missing.value, backend=backend.name,
                    detail="this host cannot translate it with this backend; the other families stay enforced")
    rules = desired_rules(cfg, networks, families)
    reconciler = Reconciler(backend, rules, log, conflicts=selection.conflicts)
    if args.command == "render":
        print(backend.render(rules), end="")
        return EXIT_OK
    if args.command == "remove":
        reconciler.remove()
        return EXIT_OK
    if args.command == "apply":
        return _apply(reconciler)
    obs = reconciler.observe()
    if args.command == "check":
        from portguard.backends.bypass import find_bypasses

        obs = obs.with_environment(obs.conflicts, find_bypasses(families))
    for conflict in obs.conflicts:
        log.warning("backend.conflict", detail=conflict)
    _print_report(obs, as_json=args.json)
    return EXIT_OK if obs.healthy else EXIT_DRIFT


def _networks(cfg: Config) -> tuple[Any, ...]:
    """Docker's networks: asked of Docker, else what the running daemon here last saw (so that check and
    apply agree with it while Docker is away), else none."""
    from portguard.runtime import RuntimeDir
    from portguard.watch.docker import read_networks

    found = read_networks(cfg.docker_host)
    if found is None:
        try:
            found = RuntimeDir().load_networks()
        except OSError:
            found = None
    return found or ()


def _apply(reconciler: Any) -> int:
    seen = reconciler.observe()
    if seen.owner.startswith("another process"):
        # The running daemon owns the table (nft 'flags owner'): it alone writes; apply only reports.
        _print_report(seen, as_json=False)
        print(f"owned by the running portguard daemon ({seen.owner}); apply changes nothing")
        return EXIT_OK if not seen.needs_write else EXIT_ERROR
    report = reconciler.sync()
    _print_report(report.after, as_json=False)
    if report.after.needs_write:
        return EXIT_ERROR
    return EXIT_OK if report.after.healthy else EXIT_DRIFT  # drift that no write of portguard's may fix


def _print_report(obs: Observation, *, as_json: bool) -> None:
    if as_json:
        doc = {
            "backend": obs.backend,
            "healthy": obs.healthy,
            "rules": [
                {"rule": s.rule.name, "mark": s.rule.mark, "state": s.state.value, "detail": s.detail}
                for s in obs.statuses
            ],
            "stale": list(obs.stale),
            "standby": list(obs.standby),
            "shadowed_by": list(obs.shadowed_by),
            "conflicts": list(obs.conflicts),
            "bypasses": list(obs.bypasses),
            "owner": obs.owner,
        }
        print(json.dumps(doc, indent=2))
        return
    total = len(obs.statuses)
    owned = f", table owned by {obs.owner}" if obs.owner else ""
    if obs.healthy:
        print(f"healthy: {total} rules in place and first to decide NAT (backend {obs.backend}{owned})")
        return
    for s in obs.statuses:
        if s.state is not State.HEALTHY:
            print(f"{s.state.value}: {s.rule.name} ({s.detail})" if s.detail else f"{s.state.value}: {s.rule.name}")
    for obj in obs.stale:
        print(f"stale: {obj}")
    for item in obs.standby:
        print(f"standby: {item}")
    for conflict in obs.conflicts:
        print(f"conflict: {conflict}")
    for bypass in obs.bypasses:
        print(f"bypass: {bypass}")
    bad = sum(1 for s in obs.statuses if s.state is not State.HEALTHY)
    print(f"drift: {bad} of {total} rules unhealthy, {len(obs.stale)} stale (backend {obs.backend})")
