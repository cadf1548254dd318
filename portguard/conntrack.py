"""Conntrack: streamed reads and exact deletes, bounded in memory and time whatever the table holds.

Healing: NAT is decided on a connection's first packet.  A SYN sent while portguard's rule was absent
or shadowed gets a conntrack entry with its untranslated port; retransmissions reuse that entry, so
the connection hangs until the SYN_SENT timeout (120 s) although the rule is back.  Deleting exactly
those entries (still unreplied, original source port in the matched range, reply direction showing
the port untranslated and outside the target range) lets the next retransmission create a new,
translated entry.  Established flows are never touched.

How: through ctnetlink (ctnetlink.py): one dump streamed and parsed as it arrives, and each stuck entry
deleted by its exact tuple and id, in batches, while the dump goes on: linear in the table, flat in
memory.  Where ctnetlink is refused, conntrack-tools is the fallback: ``conntrack -L`` parsed line by
line (about 160 bytes per entry) and one ``conntrack -R -`` for the deletes (conntrack-tools 1.4.7 walks
the whole table for each ``-D`` line: 20,000 of them did not finish in 50 s).  Every call has a deadline.
"""

from __future__ import annotations

import errno
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from portguard import ctnetlink
from portguard.errors import RetryableError
from portguard.rules import Family, PortRange, Protocol

__all__ = ["ConntrackError", "Flow", "ReadStats", "delete_flows", "heal", "iter_flows", "list_flows", "parse_flow",
           "parse_flows", "untranslated"]

_STATE = re.compile(r"[A-Z][A-Z_]+[A-Z]")  # SYN_SENT, ESTABLISHED, ... (flags are bracketed)
TIMEOUT = 50.0  # a million entries stream in about 20 s; the child running this has 60 s
MAX_HEAL_CLI = 20_000  # entries deleted per pass through conntrack-tools; the next repair (or audit) takes the rest
# ctnetlink cannot be used at all here (not "it failed this time"): fall back to conntrack-tools.
_REFUSED = (errno.EPERM, errno.EACCES, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.ENOENT)
_FAMILIES: dict[int, Family] = {socket.AF_INET: Family.IPV4, socket.AF_INET6: Family.IPV6}


class ConntrackError(RetryableError):
    """conntrack could not be read or written this time (slow, missing, killed)."""


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
    family: Family = Family.IPV4
    entry: ctnetlink.Entry | None = field(default=None, compare=False, repr=False)  # when read through ctnetlink

    def delete_args(self) -> list[str]:
        return ["-p", self.protocol, "-s", self.src, "-d", self.dst, "--sport", str(self.sport),
                "--dport", str(self.dport)]


@dataclass
class ReadStats:
    """How a read went: which interface, how many entries, how many messages were malformed and skipped."""

    via: str = ""
    entries: int = 0
    malformed: int = 0


def parse_flow(line: str) -> Flow | None:
    """One ``conntrack -L`` line (original tuple first, then the reply tuple); None when it is not one.

    One pass over the words, no regular expression per field: a daemon may read 100,000 of these."""
    words = line.split()
    if len(words) < 8 or words[0] not in ("tcp", "udp"):
        return None
    src: list[str] = []
    dst: list[str] = []
    sport: list[str] = []
    dport: list[str] = []
    state = ""
    for w in words[3:]:
        head = w[:4]
        if head == "src=":
            src.append(w[4:])
        elif head == "dst=":
            dst.append(w[4:])
        elif w.startswith("sport="):
            sport.append(w[6:])
        elif w.startswith("dport="):
            dport.append(w[6:])
        elif not state and w.isupper() and _STATE.fullmatch(w):
            state = w
    if len(src) < 2 or len(dst) < 2 or len(sport) < 2 or len(dport) < 2:
        return None
    try:
        return Flow(words[0], state, "[UNREPLIED]" in words, src[0], dst[0], int(sport[0]), int(dport[0]),
                    int(dport[1]))
    except ValueError:
        return None


def parse_flows(text: str) -> list[Flow]:
    return [f for f in map(parse_flow, text.splitlines()) if f is not None]


def is_untranslated(f: Flow, source: PortRange, target: PortRange) -> bool:
    """Left with a matched source port that was not translated and lies outside the target range."""
    return f.sport in source and f.reply_dport == f.sport and f.sport not in target


def untranslated(flows: Sequence[Flow], source: PortRange, target: PortRange) -> list[Flow]:
    """Flows caught in a gap: unreplied, source port matched but left untranslated outside the target."""
    return [f for f in flows
            if (f.state == "SYN_SENT" or (f.protocol == "udp" and f.unreplied)) and is_untranslated(f, source, target)]


def _tool() -> str | None:
    return shutil.which("conntrack")


def _argv(tool: str, family: Family, proto: Protocol, state: str | None) -> list[str]:
    argv = [tool, "-L", "-f", family.value, "-p", proto.value]
    if state and proto is Protocol.TCP:
        argv += ["--state", state]
    return argv


def _flow(e: ctnetlink.Entry) -> Flow | None:
    family = _FAMILIES.get(e.family)
    if family is None:
        return None
    return Flow(e.protocol, e.state, e.unreplied, e.src, e.dst, e.sport, e.dport, e.reply_dport, family, e)


def iter_flows(families: Sequence[Family], protocols: Sequence[Protocol], *, state: str | None = None,
               keep: Callable[[Flow], bool] = lambda _f: True, timeout: float = TIMEOUT,
               stats: ReadStats | None = None) -> Iterator[Flow]:
    """Stream conntrack entries, yielding those ``keep`` accepts; memory stays flat whatever the table size.

    ctnetlink first; conntrack-tools where ctnetlink is refused.  Raises ConntrackError when the read fails or
    does not finish in ``timeout`` seconds.
    """
    stats = stats if stats is not None else ReadStats()
    wanted_families, wanted_protocols = set(families), {p.value for p in protocols}
    dumped = ctnetlink.DumpStats()
    try:
        stats.via = "ctnetlink"
        for entry in ctnetlink.dump(dumped, deadline=time.monotonic() + timeout):
            flow = _flow(entry)
            if (flow is not None and flow.family in wanted_families and flow.protocol in wanted_protocols
                    and (state is None or flow.protocol != "tcp" or flow.state == state) and keep(flow)):
                yield flow
        return
    except ctnetlink.CtnetlinkError as exc:
        if dumped.entries or exc.errno not in _REFUSED:
            raise ConntrackError(str(exc)) from None
    finally:
        stats.entries, stats.malformed = dumped.entries, dumped.malformed
    stats.via = "conntrack"
    tool = _tool()
    if tool is None:
        return
    for family in families:
        for proto in protocols:
            yield from _stream(_argv(tool, family, proto, state), family, keep, timeout)


def _stream(argv: list[str], family: Family, keep: Callable[[Flow], bool], timeout: float) -> Iterator[Flow]:
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1 << 16)
    except OSError as exc:
        raise ConntrackError(f"conntrack: {exc.strerror}") from None
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        for line in proc.stdout or ():
            flow = parse_flow(line)
            if flow is not None and keep(flow := replace(flow, family=family)):
                yield flow
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()
    if killed.is_set():
        raise ConntrackError(f"conntrack -L did not finish within {timeout:.0f} s (killed)")


def list_flows(families: Sequence[Family], protocols: Sequence[Protocol], *, state: str | None = None) -> list[Flow]:
    """Every entry of the given families and protocols (for one-shot commands such as doctor)."""
    return list(iter_flows(families, protocols, state=state))


def delete_flows(flows: Sequence[Flow], *, timeout: float = TIMEOUT) -> int:
    """Delete entries with one ``conntrack -R -`` process (the fallback); how many were asked for when it succeeded."""
    tool = _tool()
    if tool is None or not flows:
        return 0
    commands = "".join(f"-D -f {flow.family.value} {' '.join(flow.delete_args())}\n" for flow in flows)
    try:
        proc = subprocess.run([tool, "-R", "-"], input=commands, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ConntrackError(f"conntrack -R did not finish within {timeout:.0f} s (killed)") from None
    except OSError as exc:
        raise ConntrackError(f"conntrack: {exc.strerror}") from None
    # An entry may be gone already (it timed out or was answered): that line fails, the others still count.
    failed = sum(1 for line in proc.stderr.splitlines() if "0 flow entries" in line or "No such file" in line)
    return max(0, len(flows) - failed)


def stuck(f: Flow, source: PortRange, target: PortRange) -> bool:
    """Caught in a gap: unreplied, source port matched but left untranslated outside the target range."""
    return bool(untranslated([f], source, target))


def heal(families: Sequence[Family], protocols: Sequence[Protocol], source: PortRange, target: PortRange,
         stats: ReadStats | None = None) -> int:
    """Delete the untranslated, unreplied entries; returns how many went.

    Through ctnetlink each one is deleted as the dump finds it (exact tuple and id, batched); through
    conntrack-tools at most MAX_HEAL_CLI per call."""
    stats = stats if stats is not None else ReadStats()
    deleter: ctnetlink.Deleter | None = None
    fallback: list[Flow] = []
    try:
        for flow in iter_flows(families, protocols, state="SYN_SENT", keep=lambda f: stuck(f, source, target),
                               stats=stats):
            if flow.entry is not None:
                deleter = deleter or ctnetlink.Deleter()
                deleter.add(flow.entry)
            elif len(fallback) < MAX_HEAL_CLI:
                fallback.append(flow)
        if deleter is not None:
            deleter.flush()
            return deleter.deleted
    except ctnetlink.CtnetlinkError as exc:
        raise ConntrackError(str(exc)) from None
    finally:
        if deleter is not None:
            deleter.close()
    return delete_flows(fallback)
