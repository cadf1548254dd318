"""Conntrack healing: drop entries of connections caught while the rule was missing.

NAT is decided on a connection's first packet.  A SYN sent while portguard's rule was absent or
shadowed gets a conntrack entry with its untranslated port; retransmissions reuse that entry,
so the connection hangs until the SYN_SENT timeout (120 s) although the rule is back.  Deleting
exactly those entries (still unreplied, original source port in the matched range, reply
direction showing the port untranslated and outside the target range) lets the next
retransmission create a new, translated entry.  Established flows are never touched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from portguard.rules import Family, PortRange, Protocol

__all__ = ["Flow", "heal", "list_flows", "parse_flows", "untranslated"]

_KV = re.compile(r"(\w+)=(\S+)")
_STATE = re.compile(r"[A-Z][A-Z_]+[A-Z]")  # SYN_SENT, ESTABLISHED, ... (flags are bracketed)


@dataclass(frozen=True, slots=True)
class Flow:
    protocol: str
    state: str
    unreplied: bool
    src: str
    dst: str
    sport: int
    dport: int
    reply_dport: int  # the source port the remote side sees

    def delete_args(self) -> list[str]:
        return [
            "-p",
            self.protocol,
            "-s",
            self.src,
            "-d",
            self.dst,
            "--sport",
            str(self.sport),
            "--dport",
            str(self.dport),
        ]


def parse_flows(text: str) -> list[Flow]:
    """Parse ``conntrack -L`` lines (original tuple first, then the reply tuple)."""
    flows = []
    for line in text.splitlines():
        words = line.split()
        proto = next((w for w in words if w in ("tcp", "udp")), None)
        pairs = _KV.findall(line)
        keys = [k for k, _ in pairs]
        if proto is None or keys.count("sport") < 2 or keys.count("src") < 2:
            continue
        orig = dict(pairs[: keys.index("dport") + 1])
        rest = pairs[keys.index("dport") + 1 :]
        reply = dict(rest)
        state = next((w for w in words if _STATE.fullmatch(w)), "")
        try:
            flows.append(
                Flow(
                    proto,
                    state,
                    "[UNREPLIED]" in words,
                    orig["src"],
                    orig["dst"],
                    int(orig["sport"]),
                    int(orig["dport"]),
                    int(reply["dport"]),
                )
            )
        except (KeyError, ValueError):
            continue
    return flows


def untranslated(flows: Sequence[Flow], source: PortRange, target: PortRange) -> list[Flow]:
    """Flows caught in a gap: unreplied, source port matched but left untranslated outside the target."""
    return [
        f
        for f in flows
        if (f.state == "SYN_SENT" or (f.protocol == "udp" and f.unreplied))
        and f.sport in source
        and f.reply_dport == f.sport
        and f.sport not in target
    ]


def _tool() -> str | None:
    return shutil.which("conntrack")


def list_flows(families: Sequence[Family], protocols: Sequence[Protocol], *, state: str | None = None) -> list[Flow]:
    """Conntrack entries of the given families and protocols (``conntrack -L``, one call per pair)."""
    tool = _tool()
    if tool is None:
        return []
    flows: list[Flow] = []
    for family in families:
        for proto in protocols:
            argv = [tool, "-L", "-f", family.value, "-p", proto.value]
            if state and proto is Protocol.TCP:
                argv += ["--state", state]
            listing = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            flows += parse_flows(listing.stdout)
    return flows


def heal(families: Sequence[Family], protocols: Sequence[Protocol], source: PortRange, target: PortRange) -> int:
    """Delete the untranslated, unreplied entries; returns how many went."""
    tool = _tool()
    if tool is None:
        return 0
    cleared = 0
    for family in families:
        for flow in untranslated(list_flows([family], protocols, state="SYN_SENT"), source, target):
            done = subprocess.run(
                [tool, "-D", "-f", family.value, *flow.delete_args()], capture_output=True, timeout=30, check=False
            )
            cleared += done.returncode == 0
    return cleared
