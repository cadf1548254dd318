"""The ``portguard`` command: parses options, wires objects together, maps errors to exit codes.

This is the composition root: the only module that builds the config, the logger, the backend
and the reconciler and hands them to each other.  The parser lives in parser.py (completion and the
man page are generated from it); what is printed lives in report.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from portguard.config import Config, load_config, narrow_target_warning
from portguard.desired import desired_rules
from portguard.errors import FatalError, PortguardError
from portguard.inventory import Inventory
from portguard.logs import Logger, configure_logging
from portguard.parser import COMMANDS, EXIT_DRIFT, EXIT_ERROR, EXIT_OK, UsageError, build_parser
from portguard.report import changes, document, observation_doc, observation_text, rules_doc

__all__ = ["build_parser", "main"]

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


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's completion request (argcomplete's protocol); returns only when there is none."""
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)


def _completion(shell: str) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["portguard"], shell=shell), end="")
    return EXIT_OK


def _fail(args: argparse.Namespace, message: str) -> int:
    return _error(args.command, message, as_json=getattr(args, "json", False))


def _error(command: str | None, message: str, *, as_json: bool) -> int:
    sys.stderr.write(f"portguard: {message}\n")
    if as_json:
        print(document(command, EXIT_ERROR, error=message.removeprefix("error: ")))
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _complete(parser)
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(words)
    except UsageError as exc:
        # --json asks for a document whatever went wrong, a command line that does not parse included.
        command = next((w for w in words if w in COMMANDS), None)
        return _error(command, f"error: {exc}", as_json="--json" in words)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.command in ("completion", "reload"):  # neither reads the config: one prints, one signals
        return _completion(args.shell) if args.command == "completion" else _reload(args)
    try:
        cfg = _config(args)
        if args.command in NEEDS_NET_ADMIN and not has_net_admin():
            raise FatalError(f"{args.command} needs CAP_NET_ADMIN to read netfilter tables; run it as root")
    except PortguardError as exc:
        return _fail(args, f"error: {exc}")
    log = configure_logging(cfg.log_format, cfg.log_level, sys.stdout if args.command == "run" else sys.stderr)
    try:
        return _dispatch(args, cfg, log)
    except PortguardError as exc:
        return _fail(args, f"error: {exc}")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback for the operator; the debug log keeps it
        log.debug("command.crashed", exc_info=True)
        return _fail(args, f"internal error: {type(exc).__name__}: {exc}")


def _reload(args: argparse.Namespace) -> int:
    """Signal the daemon guarding this namespace (SIGHUP) and wait for its verdict on the config."""
    import signal
    import time

    from portguard.runtime import RuntimeDir

    runtime = RuntimeDir()
    pid = runtime.daemon_pid()
    if pid is None:
        return _fail(args, "error: no `portguard run` is guarding this network namespace")
    before = runtime.reload_outcome()[0]
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return _fail(args, f"error: cannot signal the daemon (PID {pid}): {exc.strerror}")
    deadline = time.monotonic() + args.timeout
    while (outcome := runtime.reload_outcome())[0] <= before:
        if time.monotonic() > deadline:
            return _fail(args, f"error: the daemon (PID {pid}) did not answer within {args.timeout:g} s")
        time.sleep(0.05)
    _, ok, detail = outcome
    if not ok:
        return _fail(args, f"error: reload refused: {detail}")
    if args.json:
        print(document("reload", EXIT_OK, pid=pid, detail=detail))
    else:
        print(f"reloaded: {detail}")
    return EXIT_OK


def _dispatch(args: argparse.Namespace, cfg: Config, log: Logger) -> int:
    if args.command == "demo":
        from portguard.demo import run_demo

        return run_demo(as_json=args.json)
    if args.command == "install-systemd":
        from portguard.install import install_systemd

        for line in install_systemd(args.root, args.exec_path, force=args.force):
            print(line)
        return EXIT_OK
    narrow = narrow_target_warning(cfg)
    if narrow and args.command in ("apply", "run"):
        # Information, not a problem: the shipped defaults (28,233 matched ports into 11,849) are narrower.
        log.info("config.narrow_target", **narrow)
    if args.command == "doctor":
        from portguard.doctor import render_text, report_doc, run_doctor

        diagnosis = run_doctor(cfg, _inventory(cfg))
        code = EXIT_DRIFT if diagnosis.risks else EXIT_OK
        print(document("doctor", code, **report_doc(diagnosis)) if args.json else render_text(diagnosis))
        return code
    if args.command == "run":
        from portguard.daemon import run_daemon

        return run_daemon(cfg, log, cleanup_on_exit=args.cleanup_on_exit, reload_config=lambda: _config(args))
    return _netfilter_command(args, cfg, log)


def _inventory(cfg: Config) -> Inventory:
    """The runtimes' inventory, read now; for a runtime that does not answer (Docker stopped), what the running
    daemon here last saw, so that check and apply agree with it."""
    from portguard.runtime import RuntimeDir
    from portguard.runtimes import read_inventory

    try:
        recorded = RuntimeDir().load_inventory()
    except OSError:
        recorded = None
    return read_inventory(cfg, recorded)


def _netfilter_command(args: argparse.Namespace, cfg: Config, log: Logger) -> int:
    """apply, check, remove and render: one backend, the desired rules, one reconciler."""
    from portguard.detect import select_backend
    from portguard.reconciler import Reconciler

    inventory = _inventory(cfg)
    if args.command == "render" and cfg.backend != "auto":
        from portguard.backends import make_backend

        return _render(args, make_backend(cfg.backend), desired_rules(cfg, inventory))
    selection = select_backend(cfg.backend, docker_host=cfg.docker_host)
    for why in selection.skipped:
        log.info("backend.skipped", reason=why)
    log.debug("backend.selected", backend=selection.backend.name, reason=selection.reason)
    backend = selection.backend
    if args.command == "render":
        return _render(args, backend, desired_rules(cfg, inventory))
    families = [f for f in cfg.families if f in backend.families()]
    for missing in (f for f in cfg.families if f not in families):
        log.warning("family.unavailable", family=missing.value, backend=backend.name,
                    detail="this host cannot translate it with this backend; the other families stay enforced")
    reconciler = Reconciler(backend, desired_rules(cfg, inventory, families), log, conflicts=selection.conflicts)
    if args.command == "remove":
        removed = reconciler.remove()
        if args.json:
            print(document("remove", EXIT_OK, backend=backend.name, removed=removed))
        return EXIT_OK
    from portguard.backends.bypass import find_bypasses

    # A notrack rule elsewhere defeats the rules however healthy they are: check and apply both report it.
    bypasses = find_bypasses(families)
    if args.command == "apply":
        return _apply(args, reconciler, bypasses)
    obs = reconciler.observe()
    obs = obs.with_environment(obs.conflicts, bypasses)
    for conflict in obs.conflicts:
        log.warning("backend.conflict", detail=conflict)
    code = EXIT_OK if obs.healthy else EXIT_DRIFT
    print(document("check", code, **observation_doc(obs)) if args.json else observation_text(obs))
    return code


def _render(args: argparse.Namespace, backend: Any, rules: Sequence[Any]) -> int:
    text = backend.render(rules)
    if args.json:
        print(document("render", EXIT_OK, backend=backend.name, rules=rules_doc(rules), text=text))
    else:
        print(text, end="")
    return EXIT_OK


def _apply(args: argparse.Namespace, reconciler: Any, bypasses: Sequence[str]) -> int:
    seen = reconciler.observe()
    seen = seen.with_environment(seen.conflicts, bypasses)
    pending = changes(seen)
    would = any(pending.values())
    if args.dry_run:
        code = EXIT_DRIFT if would else EXIT_OK
        if args.json:
            print(document("apply", code, dry_run=True, backend=seen.backend, changed=would, changes=pending,
                           found=observation_doc(seen), result=None))
        else:
            verbs = {"added": "add", "replaced": "replace", "removed": "remove"}
            lines = [f"{verbs[kind]}: {item}" for kind, items in pending.items() for item in items]
            print("\n".join(lines) if lines else f"nothing to change (backend {seen.backend})")
        return code
    if seen.owner.startswith("another process"):
        # The running daemon owns the table (nft 'flags owner'): it alone writes; apply only reports.
        code = EXIT_ERROR if seen.needs_write else (EXIT_OK if seen.healthy else EXIT_DRIFT)
        if args.json:
            print(document("apply", code, dry_run=False, backend=seen.backend, changed=False, changes=pending,
                           found=observation_doc(seen), result=observation_doc(seen)))
        else:
            print(observation_text(seen))
            print(f"owned by the running portguard daemon ({seen.owner}); apply changes nothing")
        return code
    report = reconciler.sync(installing=True)
    after = report.after.with_environment(report.after.conflicts, bypasses)
    code = EXIT_ERROR if after.needs_write else (EXIT_OK if after.healthy else EXIT_DRIFT)
    if args.json:
        print(document("apply", code, dry_run=False, backend=after.backend, changed=report.changed, changes=pending,
                       found=observation_doc(report.before), result=observation_doc(after)))
    else:
        print(observation_text(after))
    return code
