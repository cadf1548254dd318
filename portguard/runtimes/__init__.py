"""Readers of the runtimes portguard knows: each turns what it finds into an inventory part (inventory.py).

They read (files, Docker's API, netfilter listings) and parse; they never write anything, and anything they do
not understand is left out rather than guessed at.  ``READERS`` is the one list of them: the daemon's sources
(watch/runtimes.py) and the one-shot commands both go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from portguard.config import Config
from portguard.inventory import Inventory, Part

__all__ = ["READERS", "Reader", "read_inventory"]


Diagnosis = Callable[[Config, Part | None], tuple[dict[str, Any], list[tuple[str, str]]]]


@dataclass(frozen=True, slots=True)
class Reader:
    read: Callable[[Config], Part | None]  # None: nothing of this runtime here (or, see below, no answer)
    answers_remotely: bool = False  # None may mean "did not answer" (a stopped dockerd): the recorded part stands
    diagnose: Diagnosis | None = None  # the runtime's own word on itself for doctor: (facts, [(severity, text)])


def _docker(cfg: Config) -> Part | None:
    from portguard.runtimes.docker import read_part

    return read_part(cfg.docker_host)


def _docker_diagnosis(cfg: Config, part: Part | None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    from portguard.runtimes.docker import diagnose

    return diagnose(cfg, part)


def _podman(_cfg: Config) -> Part | None:
    from portguard.runtimes.podman import read_part

    return read_part()


def _cni(_cfg: Config) -> Part | None:
    from portguard.runtimes.cni import read_part

    return read_part()


def _kube_proxy(cfg: Config) -> Part | None:
    from portguard.runtimes.kubeproxy import read_part

    return read_part(cfg.kubernetes_masquerade_mark)


READERS: dict[str, Reader] = {
    "docker": Reader(_docker, answers_remotely=True, diagnose=_docker_diagnosis),
    "podman": Reader(_podman),
    "cni": Reader(_cni),
    "kube-proxy": Reader(_kube_proxy),
}


def read_inventory(cfg: Config, recorded: Inventory | None = None) -> Inventory:
    """Every runtime's part, read now.  A runtime that answers remotely may not answer (a stopped dockerd): then
    the part the running daemon recorded stands in for it, so that check and apply agree with the daemon."""
    parts: dict[str, Part] = {}
    for name, reader in READERS.items():
        part = reader.read(cfg)
        if part is None and reader.answers_remotely and recorded is not None:
            part = recorded.part(name)
        if part is not None:
            parts[name] = part
    return Inventory.of(parts)
