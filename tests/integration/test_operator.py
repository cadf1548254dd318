"""What an operator touches every day: shell completion, the man page, --json documents, apply --dry-run and
journald priorities, each checked against the real program (and, for the tables, a real namespace)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import BACKENDS, apply, delete_rule
from netns import REPO, Netns

from portguard.parser import COMMANDS, build_parser

PORTGUARD = [sys.executable, "-m", "portguard"]
COMPLETE = r"""
source <({portguard} completion bash)
complete_words() {{
    COMP_LINE="$1"; COMP_POINT=${{#COMP_LINE}}; read -ra COMP_WORDS <<< "$1"
    [[ "$1" == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
    _python_argcomplete portguard
    printf '%s\n' "${{COMPREPLY[@]}}"
}}
complete_words "$1"
"""


def _bash_complete(line: str) -> list[str]:
    # The completion script names the program; a wrapper on PATH stands for the installed `portguard`.
    script = COMPLETE.format(portguard="portguard")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", "-c", script, "bash", line], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return [w.strip() for w in proc.stdout.splitlines() if w.strip()]


def test_bash_completion_script_is_valid_and_completes_commands_and_backends() -> None:
    """`portguard completion bash` passes `bash -n`; in bash it completes subcommands and --backend values."""
    script = subprocess.run([*PORTGUARD, "completion", "bash"], capture_output=True, text=True, check=True).stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    assert set(COMMANDS) <= set(_bash_complete("portguard "))
    assert set(_bash_complete("portguard check --backend ")) == {"auto", "nftables", "iptables-nft",
                                                                  "iptables-legacy"}
    assert _bash_complete("portguard ap") == ["apply"]


@pytest.mark.parametrize(("shell", "marker"), [("zsh", "#compdef portguard"), ("fish", "complete --command portguard")])
def test_zsh_and_fish_completion_scripts_name_the_program(shell: str, marker: str) -> None:
    """zsh and fish get argcomplete's script for `portguard` (the same parser answers every shell)."""
    out = subprocess.run([*PORTGUARD, "completion", shell], capture_output=True, text=True, check=True).stdout
    assert marker in out, out[:300]


def test_man_page_is_built_into_the_wheel_and_names_every_command_and_option(tmp_path: Path) -> None:
    """Building the package generates portguard.1 from the parser; `man -l` renders it with every subcommand and
    every option the parser has."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("portguard-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        page = tmp_path / "portguard.1"
        page.write_bytes(zf.read("portguard/data/portguard.1"))
    text = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, check=True,
                          env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin"}).stdout
    text = re.sub(r".\x08", "", text)
    for command in COMMANDS:
        assert f"portguard {command}" in text, command
    options = {opt for action in build_parser()._actions for opt in action.option_strings}
    for sub in build_parser()._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        options |= {opt for action in sub._actions for opt in action.option_strings}
    missing = [opt for opt in options - {"-h", "--help"} if opt not in text]  # argparse-manpage omits help
    assert not missing, missing


def _state(ns: Netns) -> str:
    saves = "".join(ns.run([t]).stdout for t in ("iptables-nft-save", "iptables-legacy-save", "ip6tables-nft-save"))
    return ns.nft("list", "ruleset") + "\n".join(ln for ln in saves.splitlines() if not ln.startswith("#"))


def _json(ns: Netns, *args: str) -> tuple[int, dict[str, object]]:
    proc = ns.portguard(*args, "--json")
    doc = json.loads(proc.stdout)
    assert doc["exit"] == proc.returncode and doc["command"] == args[0], doc
    return proc.returncode, doc


@pytest.mark.netns
def test_every_json_document_parses_and_has_its_documented_shape(ns: Netns) -> None:
    """check, apply (and --dry-run), render, doctor and remove: one JSON document each, with the README's keys."""
    check_keys = {"backend", "healthy", "owner", "rules", "stale", "standby", "shadowed_by", "conflicts", "bypasses"}
    code, doc = _json(ns, "check")
    assert code == 1 and check_keys <= doc.keys()
    code, doc = _json(ns, "apply", "--dry-run")
    assert code == 1 and doc["dry_run"] is True and doc["changed"] is True and doc["result"] is None
    assert {"added", "replaced", "removed"} == set(doc["changes"])  # type: ignore[arg-type]
    code, doc = _json(ns, "apply")
    assert code == 0 and doc["changed"] is True and check_keys <= set(doc["result"])  # type: ignore[arg-type]
    code, doc = _json(ns, "render")
    assert code == 0 and doc["backend"] == "nftables" and "table inet portguard" in str(doc["text"])
    assert {"rule", "mark", "family", "action", "spec"} <= set(doc["rules"][0])  # type: ignore[index]
    code, doc = _json(ns, "doctor")
    assert {"backend", "backend_reason", "healthy", "findings", "facts"} <= doc.keys()
    code, doc = _json(ns, "remove")
    assert code == 0 and doc["removed"] == 2
    proc = ns.portguard("check", "--json", "--backend", "pf")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    error = proc.stderr.split("error: ", 1)[1].strip()
    assert json.loads(proc.stdout) == {"command": "check", "exit": 2, "error": error}


def test_the_cli_takes_what_the_readme_promises(tmp_path: Path) -> None:
    """--version after a subcommand too; PORTGUARD_IMAGE (the Swarm stack's variable) is no setting; install-systemd
    without --exec writes the portguard that runs it (here: this Python, -m portguard)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PORTGUARD_")}, "PORTGUARD_CONFIG": "/dev/null"}
    version = subprocess.run([*PORTGUARD, "render", "--version"], capture_output=True, text=True, env=env, check=False)
    assert version.returncode == 0 and version.stdout.startswith("portguard "), version.stderr
    image = subprocess.run([*PORTGUARD, "render", "--backend", "nftables"], capture_output=True, text=True,
                           env={**env, "PORTGUARD_IMAGE": "registry.example/portguard:1"}, check=False)
    assert image.returncode == 0 and "table inet portguard" in image.stdout, image.stderr
    unit = subprocess.run([*PORTGUARD, "install-systemd", "--root", str(tmp_path)], capture_output=True, text=True,
                          env=env, check=False)
    assert unit.returncode == 0, unit.stderr
    text = (tmp_path / "etc/systemd/system/portguard.service").read_text()
    assert f"ExecStart={sys.executable} -m portguard run" in text
    assert f"ExecReload={sys.executable} -m portguard reload" in text


@pytest.mark.netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_dry_run_writes_nothing_and_reports_empty_broken_and_healthy(ns: Netns, backend: str) -> None:
    """--dry-run on an empty namespace (everything to add, exit 1), a broken one (the deleted rule, exit 1) and a
    healthy one (nothing, exit 0); the kernel's nft and xtables state is unchanged by it each time."""
    if backend == "iptables-legacy":
        ns.run(["iptables-legacy", "-t", "nat", "-S"])  # a legacy host: its nat table exists already
    for stage in ("empty", "broken", "healthy"):
        if stage == "broken":
            apply(ns, backend)
            delete_rule(ns, backend)
        elif stage == "healthy":
            apply(ns, backend)
        before = _state(ns)
        code, doc = _json(ns, "apply", "--dry-run", "--backend", backend)
        assert _state(ns) == before, stage
        pending = doc["changes"]
        if stage == "empty":
            assert code == 1 and "ipv4/tcp/host" in pending["added"], pending  # type: ignore[index]
        elif stage == "broken":
            assert code == 1 and pending["added"] == ["ipv4/tcp/host"], pending  # type: ignore[index]
        else:
            assert code == 0 and pending == {"added": [], "replaced": [], "removed": []}, pending
        text = ns.portguard("apply", "--dry-run", "--backend", backend)
        assert text.returncode == code and (("add: ipv4/tcp/host" in text.stdout) == (stage != "healthy"))


@pytest.mark.netns
def test_journald_priorities_exactly_when_journal_stream_is_set(ns: Netns) -> None:
    """With JOURNAL_STREAM, every log line starts with <N> (warning <4>, info <6>); without it, none does.  (The
    legacy backend without a legacy ip6 nat table warns that IPv6 is not translated.)"""
    plain = ns.portguard("apply", "--log-level", "info", "--backend", "iptables-legacy")
    journal = ns.portguard("apply", "--log-level", "info", "--backend", "iptables-legacy",
                           env={"JOURNAL_STREAM": "8:12345"})
    plain_lines = [ln for ln in plain.stderr.splitlines() if ln]
    journal_lines = [ln for ln in journal.stderr.splitlines() if ln]
    assert plain_lines and not any(re.match(r"<\d>", ln) for ln in plain_lines), plain_lines
    assert journal_lines and all(re.match(r"<[2-7]>\{", ln) for ln in journal_lines), journal_lines
    assert any(ln.startswith("<4>") and '"level": "warning"' in ln for ln in journal_lines)
