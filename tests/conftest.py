from __future__ import annotations

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
