"""The unit's cases (test_platform_systemd_<suite>.py run them, one file per userland): the shipped unit under
the userland's own systemd (Debian 12's 252 and 13's 257, booted with systemd-nspawn
in a test network namespace; unstable's 262 refuses this machine's hybrid cgroup hierarchy and is not booted).

The project is installed by its own ``scripts/install.sh`` (in this machine's network namespace: the test
namespace has no route to the registry), then the userland boots and install.sh runs again inside it, offline,
where systemd is up: daemon-reload, enable, restart, status and check.  Everything the unit's hardening could
forbid is exercised inside it: READY=1, reload (``ExecReload`` without /bin/kill), the watchdog, journald
priorities, conntrack healing and the effect audit in their niced child, and stop.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import keep_conntrack_on
from netns import REPO, Netns, wait_for
from topology import ACL_LOW, AclNetwork
from userland import ENV, SUITES, Booted, Userland

MARKS = [pytest.mark.netns, pytest.mark.platform]
CONFIG = "[daemon]\naudit_interval = 2.0\n[log]\nlevel = \"debug\"\n"  # debug: each audit says it ran
WHEELHOUSE = "/root/wheelhouse"
STUCK = 6  # connections started while nothing translates: their SYNs are dropped by the ACL until healed
HOLD = """
import socket, sys
s = socket.create_connection(("198.51.100.2", 8080), timeout=float(sys.argv[1]))
s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n"); print(s.recv(100).decode().split()[1], flush=True)
"""


@dataclass
class Unit:
    ul: Userland
    ns: Netns
    acl: AclNetwork
    box: Booted
    stuck: list[subprocess.Popen[str]]
    install: subprocess.CompletedProcess[str]

    def events(self, *journal_args: str) -> list[str]:
        return [e.get("MESSAGE", "") for e in self.box.journal(*journal_args)]

    def named(self, name: str) -> list[str]:
        return [m for m in self.events() if f'"event": "{name}"' in m]


def unit_fixture(name: str) -> Any:
    """The module-wide booted userland: test_platform_systemd_<name>.py binds it as its ``unit`` fixture."""
    assert SUITES[name].systemd_boots, name

    @pytest.fixture(scope="module")
    def unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unit]:
        yield from _unit(name, tmp_path_factory)

    return unit


def _unit(name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unit]:
    ul = Userland(SUITES[name])
    ns = Netns("pgsd")
    acl: AclNetwork | None = None
    try:
        ul.install_portguard()  # systemd is not up yet: the unit is written, not started
        # The booted box's network reaches no package index: a wheelhouse of what building portguard needs (its
        # build-system requirements), fetched from here, serves the re-install inside it.
        requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
        ul.run(["/opt/portguard/bin/pip", "download", "--quiet", "--disable-pip-version-check", "-d", WHEELHOUSE,
                *requires], timeout=300)
        ul.put({"/etc/portguard/portguard.toml": CONFIG.encode()})
        # A stateless ACL that drops (not rejects) low source ports: SYNs sent before portguard runs stay
        # unanswered, their conntrack entries stuck in SYN_SENT with the untranslated port.
        acl = AclNetwork(ns, action="DROP")
        keep_conntrack_on(ns)
        box = Booted(ul, ns, tmp_path_factory.mktemp(f"systemd-{name}") / "nspawn.log")
        stuck = [ns.popen([sys.executable, "-c", HOLD, "60"], stdout=subprocess.PIPE, text=True)  # type: ignore[call-overload]
                 for _ in range(STUCK)]
        assert wait_for(lambda: ns.run(["conntrack", "-L", "-p", "tcp", "--dport", "8080", "--state", "SYN_SENT"],
                                       check=False).stdout.count("\n") >= STUCK, 10)  # every SYN sent, dropped
        # install.sh again, now that systemd is up (what an upgrade runs): daemon-reload, enable, restart, status,
        # check - offline (nothing missing, python-iptables already built; pip takes the wheelhouse).
        variables = [f"{k}={v}" for k, v in ENV.items()]
        install = box.run(["env", "-i", *variables, "PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELHOUSE}", "bash", "-c",
                           "cd /root/portguard && ./scripts/install.sh"], check=False, timeout=300)
        yield Unit(ul, ns, acl, box, stuck, install)
        box.poweroff()
    finally:
        if acl is not None:
            acl.close()
        ns.close()
        ul.close()


def test_install_with_systemd_up_starts_it_and_heals_the_connections_stuck_before_it(unit: Unit) -> None:
    """scripts/install.sh where systemd runs, to its end: `systemctl restart` returns once READY=1 came (active,
    running, Type=notify), its own `check` says healthy; the start's install deletes the stuck untranslated
    SYN_SENT entries from inside the sandbox (the niced child is allowed setpriority), so the connections made
    before portguard ran complete with a translated port."""
    assert unit.install.returncode == 0, unit.install.stdout[-3000:] + unit.install.stderr[-3000:]
    assert "active (running)" in unit.install.stdout and "\nhealthy: " in unit.install.stdout, unit.install.stdout
    assert "installing a C compiler" not in unit.install.stdout + unit.install.stderr
    assert "enabled" in unit.box.systemctl("is-enabled", "portguard").stdout
    state = unit.box.systemctl("show", "-p", "ActiveState", "-p", "SubState", "-p", "Type", "portguard").stdout
    assert "ActiveState=active" in state and "SubState=running" in state and "Type=notify" in state, state
    for proc in unit.stuck:
        out, _ = proc.communicate(timeout=70)
        assert proc.returncode == 0 and out.strip() == "200", (out, unit.events()[-20:])
    assert unit.acl.ports and min(unit.acl.ports[-STUCK:]) >= ACL_LOW, unit.acl.ports
    assert wait_for(lambda: unit.named("conntrack.healed"), 10), unit.events()[-20:]


def test_the_audit_runs_inside_the_sandbox_and_nothing_fails(unit: Unit) -> None:
    """With audit_interval = 2 s, audits run in the sandbox (each says so at debug level), and no `*_failed` event
    comes at all."""
    assert wait_for(lambda: len(unit.named("audit.completed")) >= 2, 15), unit.events()[-20:]
    failed = [m for m in unit.events() if '_failed"' in m]
    assert failed == [], failed
    assert unit.acl.connect() and unit.acl.ports[-1] >= ACL_LOW


def test_journal_carries_syslog_priorities(unit: Unit) -> None:
    """The journal stores each line's level: a repair (the standby deleted by hand) is found with -p warning,
    the start only with -p info."""
    unit.box.run(["nft", "delete", "table", "inet", "portguard_standby"])
    assert wait_for(lambda: any('"rule.repaired"' in m for m in unit.events("-p", "warning")), 10), unit.events()
    warnings = unit.events("-p", "warning")
    assert warnings and not any('"daemon.started"' in m for m in warnings), warnings
    assert any('"daemon.started"' in m for m in unit.events("-p", "info"))


def test_reload_applies_a_changed_config_and_refuses_a_broken_one(unit: Unit) -> None:
    """`systemctl reload` (ExecReload runs `portguard reload`, no /bin/kill needed): a new target range is in force
    when it returns; a broken config makes it fail and the running config stays."""
    unit.ul.put({"/etc/portguard/portguard.toml": ('to_ports = "50000-61000"\n' + CONFIG).encode()})
    done = unit.box.systemctl("reload", "portguard", check=False)
    assert done.returncode == 0, unit.box.run(["journalctl", "--no-pager", "-n", "30"]).stdout
    assert "snat to :50000-61000" in unit.box.run(["nft", "list", "table", "inet", "portguard"]).stdout
    assert unit.acl.connect() and unit.acl.ports[-1] >= 50000
    unit.ul.put({"/etc/portguard/portguard.toml": b'to_ports = "nonsense"\n'})
    failed = unit.box.systemctl("reload", "portguard", check=False)
    assert failed.returncode != 0
    assert "ActiveState=active" in unit.box.systemctl("show", "-p", "ActiveState", "portguard").stdout
    assert "snat to :50000-61000" in unit.box.run(["nft", "list", "table", "inet", "portguard"]).stdout
    unit.ul.put({"/etc/portguard/portguard.toml": CONFIG.encode()})
    unit.box.systemctl("reload", "portguard")


def test_the_watchdog_holds(unit: Unit) -> None:
    """Longer than WatchdogSec (30 s) later: pings keep coming, no restart, still running."""
    def watchdog() -> str:
        return unit.box.systemctl("show", "-p", "WatchdogTimestampMonotonic", "-p", "NRestarts", "portguard").stdout

    first = watchdog()
    time.sleep(32)
    later = watchdog()
    assert "NRestarts=0" in later and later != first, (first, later)
    assert "ActiveState=active" in unit.box.systemctl("show", "-p", "ActiveState", "portguard").stdout


def test_stop_leaves_the_standby_translating(unit: Unit) -> None:
    """`systemctl stop`: the owned table goes with the daemon, the standby keeps every rule in force."""
    unit.box.systemctl("stop", "portguard")
    assert unit.box.run(["nft", "list", "table", "inet", "portguard"], check=False).returncode != 0
    standby = unit.box.run(["nft", "list", "table", "inet", "portguard_standby"]).stdout
    assert "fib saddr type local" in standby, standby
    assert unit.acl.connect() and unit.acl.ports[-1] >= ACL_LOW
    assert unit.box.run(["/opt/portguard/bin/portguard", "check"]).returncode == 0


def test_the_readme_uninstall_leaves_nothing(unit: Unit) -> None:
    """The README's uninstall lines, as written (sudo aside), under systemd: no unit, no tables, no files."""
    readme = (REPO / "README.md").read_text().split("\n## Uninstall\n", 1)[1].split("\n## ", 1)[0]
    script = "\n".join(ln.strip().removeprefix("sudo ") for ln in readme.splitlines() if ln.startswith("    "))
    unit.box.run(["bash", "-ec", script.replace("\\\n", " ")])
    assert "could not be found" in unit.box.systemctl("status", "portguard", check=False).stderr
    left = unit.box.run(["sh", "-c", "ls -d /opt/portguard /usr/local/bin/portguard /etc/portguard "
                                     "/etc/systemd/system/portguard.service /usr/local/share/man/man1/portguard.1 "
                                     "/usr/share/*/*/*portguard* 2>/dev/null || true"]).stdout
    assert left == "", left
    assert unit.box.run(["nft", "list", "tables"]).stdout.count("portguard") == 0


# The cases every userland runs, in this order (a test module binds them: run_cases()).
CASES = (
    test_install_with_systemd_up_starts_it_and_heals_the_connections_stuck_before_it,
    test_the_audit_runs_inside_the_sandbox_and_nothing_fails,
    test_journal_carries_syslog_priorities,
    test_reload_applies_a_changed_config_and_refuses_a_broken_one,
    test_the_watchdog_holds,
    test_stop_leaves_the_standby_translating,
    test_the_readme_uninstall_leaves_nothing,
)
