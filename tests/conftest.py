from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import Netns


@pytest.fixture
def acl(ns: Netns) -> Iterator[Any]:
    """The stateless ACL and its server in front of ``ns`` (tests/topology.py), removed afterwards."""
    from topology import AclNetwork

    net = AclNetwork(ns)
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def daemons() -> Iterator[list[Any]]:
    """`portguard run` processes a test starts (tests/daemonproc.py); each is ended by PID afterwards."""
    started: list[Any] = []
    yield started
    for d in started:
        d.close()


@pytest.fixture
def ns() -> Iterator[Netns]:
    """A fresh network namespace, removed afterwards with everything started in it."""
    space = Netns()
    try:
        yield space
    finally:
        space.close()


# ---- the platform matrix writes the README's "Tested platforms" table (tests/platform_cases.py) ----

_BEGIN, _END = "<!-- tested-platforms:begin -->", "<!-- tested-platforms:end -->"
_outcomes: dict[tuple[str, str], list[str]] = {}  # (module, suite) -> outcomes of its tests


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # pytest-xdist workers have it; the controller sees every report


_view: list[Any] = []  # this machine's view when the session started (tests/hostview.py)


def pytest_sessionstart(session: pytest.Session) -> None:
    if _controller(session.config):
        from hostview import HostView
        from userland import PLATFORM_ROWS

        _view.append(HostView.take())

        for row in PLATFORM_ROWS.glob("*.json"):
            row.unlink(missing_ok=True)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Outcomes of test_platform_<suite>.py and test_platform_systemd_<suite>.py, by kind and suite."""
    module = report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    if module.startswith("test_platform_") and (report.when == "call" or report.failed):
        kind, _, suite = module.removeprefix("test_").rpartition("_")
        _outcomes.setdefault((kind, suite), []).append(report.outcome)


def _result(module: str, suite: str) -> str:
    outcomes = _outcomes.get((module, suite), [])
    if not outcomes:
        return "not run"
    failed = outcomes.count("failed")
    return f"{len(outcomes) - failed} passed" + (f", {failed} failed" if failed else "")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run when this machine's own network namespace, mounts or named namespaces differ from how the
    session found them, or a process is left in a namespace made during the run.  Then rewrite the table between
    the README's markers from this run's rows - only when the whole matrix ran: a run of one platform file leaves
    the table as the last full run wrote it."""
    if not _controller(session.config):
        return
    from hostview import leftovers

    problems = leftovers(_view[0]) if _view else []
    if problems:
        print("\n== the run left this machine changed:\n" + "\n".join(problems), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    from userland import PLATFORM_ROWS, SUITES

    rows = {p.stem: json.loads(p.read_text()) for p in PLATFORM_ROWS.glob("*.json")}
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    if set(rows) != set(SUITES) or _BEGIN not in text:
        return
    lines = ["| Debian | Docker | Python | nft | iptables | platform tests | the unit under its systemd |",
             "|---|---|---|---|---|---|---|"]
    for name, suite in SUITES.items():
        v = rows.get(name, {})
        unit = _result("platform_systemd", name) if suite.systemd_boots else \
            "not run here: its systemd refuses this machine's hybrid cgroups"
        lines.append(f"| {name} | {v.get('docker', '?')} | {v.get('python', '?')} | {v.get('nft', '?')} | "
                     f"{v.get('iptables', '?')} | {_result('platform', name)} | {unit} |")
    head, _, rest = text.partition(_BEGIN)
    _, _, tail = rest.partition(_END)
    readme.write_text(f"{head}{_BEGIN}\n" + "\n".join(lines) + f"\n{_END}{tail}")
