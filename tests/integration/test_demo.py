"""`portguard demo`: the story it tells is true, and it leaves nothing behind (also when interrupted)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.docker]


def _demo_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("pgdemo-")]


def _demo_mounts() -> list[str]:
    """Mounts below a demo's directory: dockerd's overlays and the bind mount that would keep its namespace alive."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [ln.split()[4] for ln in lines if "/portguard-demo-" in ln.split()[4]]


def _own_namespace_rules() -> str:
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False).stdout
    legacy = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True, check=False).stdout
    return nft + "".join(ln for ln in legacy.splitlines(keepends=True) if ln.startswith("-A"))


def test_demo_shows_failure_shadowing_and_repair_with_a_real_dockerd() -> None:
    """Without a rule the container is rejected; the bare seed rule works until `docker network create`
    shadows it; with portguard the container passes with a translated port, also after two flushes."""
    own_before = _own_namespace_rules()
    proc = subprocess.run([sys.executable, "-m", "portguard", "demo", "--json"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["command"], doc["exit"], doc["docker"]) == ("demo", 0, {"used": True, "why_not": ""}), doc
    rows = doc["scenes"]
    results = [(r["scene"].split(".")[0], r["result"]) for r in rows]
    assert results == [("1", "REJECTED"), ("2", "passes ACL"), ("3", "REJECTED"), ("4", "passes ACL"),
                       ("5", "passes ACL"), ("6", "passes ACL")], rows
    assert all(r["source_port"] >= 49152 for r in rows if r["result"] == "passes ACL"), rows
    assert rows[4]["note"] == "not affected (own table)", rows
    assert rows[5]["note"] == "not affected (the kernel keeps the table of `portguard run`)", rows
    assert _demo_namespaces() == [] and _demo_mounts() == []
    assert _own_namespace_rules() == own_before


def test_demo_cleans_up_when_interrupted() -> None:
    """Ctrl-C in the middle: exit 130 and every namespace the demo made is gone."""
    # SIGINT at its default: a shell that started this suite in the background may have it ignored, and
    # Python only turns SIGINT into KeyboardInterrupt when it was not ignored at start.
    proc = subprocess.Popen([sys.executable, "-m", "portguard", "demo"], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    assert wait_for(lambda: any("pgdemo" in n for n in _demo_namespaces()), 30)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted: namespaces removed" in out
    assert _demo_namespaces() == [] and _demo_mounts() == []
