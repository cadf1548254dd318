"""kube-proxy's masquerade mark as an inventory part.

kube-proxy marks the service traffic it wants masqueraded (``0x4000/0x4000`` unless ``--iptables-masquerade-bit``
says otherwise) and masquerades it in ``KUBE-POSTROUTING`` with ``--random-fully`` (ports anywhere in 1024-65535).
With ``kubernetes.masquerade_mark = "auto"`` the mark is read from kube-proxy's own rules where they exist; a mark
given in the config is used as it is; ``""`` turns this off.
"""

from __future__ import annotations

from portguard.backends.foreign import kube_proxy_marks
from portguard.inventory import Part
from portguard.rules import parse_mark

__all__ = ["read_part"]


def read_part(setting: str) -> Part | None:
    """The mark part; None when there is nothing to say (off, or kube-proxy not found)."""
    if setting == "":
        return None
    if setting != "auto":
        mark = parse_mark(setting)  # validated by the config already
        return Part(marks=(mark,)) if mark else None
    marks = kube_proxy_marks()
    return Part(marks=marks) if marks else None
