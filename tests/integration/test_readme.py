"""The README's own examples, run: the jq lines, the configuration keys, the log line, the quickstart's test
command in CI, and what a normal start logs.  (The uninstall list runs under systemd: tests/systemd_cases.py.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from daemonproc import PortguardDaemon
from helpers import DOCKER_RULE, apply
from netns import REPO, Netns, wait_for

from portguard.config import KEYS, env_name

pytestmark = pytest.mark.netns
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_jq_examples_work_on_real_output(ns: Netns) -> None:
    """Every `portguard ... | jq ...` line of "Everyday use", on a namespace with the rules applied: jq accepts
    portguard's document and prints what the line promises."""
    lines = [ln.split("#")[0].strip() for ln in _section("Everyday use").splitlines() if "| jq" in ln]
    assert len(lines) == 2, lines
    apply(ns, "nftables")
    for line in lines:
        command, _, jq = line.partition("|")
        words = shlex.split(command)
        assert words[0] == "portguard", line
        produced = ns.portguard(*words[1:])
        assert produced.returncode in (0, 1), produced.stderr
        filtered = subprocess.run(["jq", *shlex.split(jq)[1:]], input=produced.stdout, capture_output=True,
                                  text=True, check=False)
        assert filtered.returncode == 0, (line, filtered.stderr)
        if "changes" in line:
            assert set(json.loads(filtered.stdout)) == {"added", "replaced", "removed"}, filtered.stdout
        else:
            assert filtered.stdout == "", filtered.stdout  # healthy: no rule is not


def test_the_configuration_table_names_every_key_and_its_variable() -> None:
    """The table's keys are exactly the config's, each with its PORTGUARD_ variable."""
    rows = [ln for ln in _section("Configuration").splitlines() if ln.startswith("| `")]
    named: dict[str, str] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        keys = re.findall(r"`([a-z_.]+)`", cells[0])
        variables = re.findall(r"`(PORTGUARD_[A-Z_]+|\.\.\._[A-Z_]+)`", cells[2])
        for key, variable in zip(keys, variables, strict=True):
            named[key] = variable
    assert set(named) == set(KEYS)
    for key, variable in named.items():
        assert variable == env_name(key) or env_name(key).endswith(variable.lstrip(".")), (key, variable)


def test_the_log_line_has_the_shape_of_a_real_repair(ns: Netns, tmp_path: Path,
                                                     daemons: list[PortguardDaemon]) -> None:
    """The Logs section's example is a rule.repaired event as the daemon writes it: the same fields."""
    example = json.loads(next(ln.strip() for ln in _section("Logs").splitlines() if ln.strip().startswith("{")))
    d = PortguardDaemon(ns, tmp_path, "--backend", "iptables-nft")
    daemons.append(d)
    assert d.wait_note("READY=1"), d.log_path.read_text()
    ns.run(["iptables-nft", *DOCKER_RULE])  # Docker's insert at position 1: the early jump is shadowed
    assert d.wait_event("rule.repaired"), d.log_path.read_text()
    real = next(e for e in d.named("rule.repaired") if e["reason"] == example["reason"])
    assert set(real) == set(example) and real["level"] == example["level"], (real, example)


def test_a_normal_start_logs_nothing_above_info(ns: Netns, tmp_path: Path, daemons: list[PortguardDaemon]) -> None:
    """`journalctl -p warning` shows only repairs, storms and errors: a start with the shipped config, on a host
    without Docker, writes no warning."""
    d = PortguardDaemon(ns, tmp_path, env={"PORTGUARD_CONFIG": str(REPO / "systemd" / "portguard.toml"),
                                           "DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    daemons.append(d)
    assert d.wait_note("READY=1"), d.log_path.read_text()
    assert wait_for(lambda: d.named("docker.unavailable"), 5)
    loud = [e for e in d.events() if e.get("level") not in ("debug", "info")]
    assert loud == [], loud


def test_ci_runs_the_quickstart_test_command() -> None:
    """The quickstart's two commands are the install and the test script; .ci/run runs exactly the latter."""
    commands = [ln.split("#")[0].strip() for ln in _section("Quickstart").splitlines() if ln.startswith("    ./")]
    assert commands == ["./scripts/install.sh", "./scripts/test.sh"]
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == commands[1]
