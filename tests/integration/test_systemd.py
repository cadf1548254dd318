"""The systemd unit: valid, hardened to exposure <= 2.0, and installable into a scratch root."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from portguard.install import install_systemd

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "portguard.service"


def test_install_systemd_writes_unit_and_example_config(tmp_path: Path) -> None:
    """install-systemd puts the unit (ExecStart = the given program) and the config under the root."""
    proc = subprocess.run(
        [sys.executable, "-m", "portguard", "install-systemd", "--root", str(tmp_path), "--exec", sys.executable],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    unit = (tmp_path / "etc/systemd/system/portguard.service").read_text()
    assert f"ExecStart={sys.executable} run" in unit
    config = tmp_path / "etc/portguard/portguard.toml"
    assert config.read_text() == (REPO / "systemd" / "portguard.toml").read_text()
    config.write_text('to_ports = "50000-60000"\n')
    install_systemd(tmp_path, sys.executable)
    assert config.read_text() == 'to_ports = "50000-60000"\n'  # an operator's config is never overwritten


def test_an_edited_unit_is_kept_unless_forced(tmp_path: Path) -> None:
    """A unit the operator edited survives a re-install; --force replaces it."""
    install_systemd(tmp_path, sys.executable)
    unit = tmp_path / "etc/systemd/system/portguard.service"
    edited = unit.read_text().replace("RestartSec=2s", "RestartSec=5s")
    unit.write_text(edited)
    assert any(line.startswith("kept ") for line in install_systemd(tmp_path, sys.executable))
    assert unit.read_text() == edited
    install_systemd(tmp_path, sys.executable, force=True)
    assert "RestartSec=2s" in unit.read_text()


def test_install_systemd_rejects_paths_that_would_inject_directives(tmp_path: Path) -> None:
    """A newline (or another control character) in --exec or --root: one line, exit 2, nothing written."""
    for args in (["--exec", "/usr/bin/true\nExecStartPre=/bin/sh -c evil"], ["--exec", "relative/portguard"],
                 ["--root", f"{tmp_path}/x\ty"]):
        argv = ["--root", str(tmp_path), *args] if args[0] == "--exec" else [*args, "--exec", sys.executable]
        proc = subprocess.run([sys.executable, "-m", "portguard", "install-systemd", *argv], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "etc").exists()


def test_install_script_refuses_a_pipe_and_a_copy_outside_the_checkout(tmp_path: Path) -> None:
    """`curl ... | bash` would install whatever directory it runs in: refused, exit 2, before anything happens;
    so is a copy of the script outside a checkout of portguard."""
    script = REPO / "scripts" / "install.sh"
    piped = subprocess.run(["bash"], input=script.read_text(), capture_output=True, text=True, cwd=tmp_path,
                           check=False)
    assert piped.returncode == 2 and "not from a pipe" in piped.stderr, piped.stderr
    copy = tmp_path / "scripts" / "install.sh"
    copy.parent.mkdir()
    copy.write_text(script.read_text())
    elsewhere = subprocess.run(["bash", str(copy)], capture_output=True, text=True, check=False)
    assert elsewhere.returncode == 2 and "is not a checkout of portguard" in elsewhere.stderr, elsewhere.stderr


def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the installed unit (its ExecStart exists)."""
    install_systemd(tmp_path, sys.executable)
    unit = tmp_path / "etc/systemd/system/portguard.service"
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_unit_exposure_is_at_most_2() -> None:
    """`systemd-analyze security --offline=true` rates the unit 2.0 or better."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True, check=False
    )
    level = re.search(r"Overall exposure level for portguard.service: (\d+\.\d+)", proc.stdout)
    assert level, proc.stdout + proc.stderr
    assert float(level.group(1)) <= 2.0, proc.stdout


def test_unit_orders_after_docker_without_binding_to_it() -> None:
    """Type=notify with a watchdog, restarted always, after docker/firewalld, never PartOf/BindsTo docker."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=always",
        "After=docker.service firewalld.service network-online.target",
        "Wants=network-online.target",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ):
        assert line in text, line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert not re.search(r"^(PartOf|BindsTo|Requires)=.*docker", text, re.M)
