"""A stateless ACL in front of a server, like an AWS NACL: TCP from source ports < 49152 is rejected.

    [inner 10.88.0.2] --- [near 10.88.0.1 | 198.51.100.1 (+ .32) v-near 2001:db8:100::1]
                                    --- [far 198.51.100.2 / 2001:db8:100::2: ACL + servers]

The near namespace is the "host" portguard protects (a secondary address .32 on the same
interface); the optional inner namespace sits behind it and is forwarded.  The far side records
the source address and port of every connection it accepts: on ``PORT`` behind the ACL (both
families), and on ``OPEN_PORT`` without one, to see ports that were left untranslated.
"""

from __future__ import annotations

import subprocess
import sys
import threading

from netns import Netns, wait_for

from portguard.demo import CLIENT

__all__ = ["ACL_LOW", "CLIENT_PORTS", "INNER_IP", "INNER_NET", "NEAR_IP", "NEAR_IP6", "OPEN_PORT", "SECONDARY_IP",
           "SERVER_IP", "SERVER_IP6", "AclNetwork"]

ACL_LOW = 49152
SERVER_IP, SERVER_IP6 = "198.51.100.2", "2001:db8:100::2"
NEAR_IP, NEAR_IP6, SECONDARY_IP = "198.51.100.1", "2001:db8:100::1", "198.51.100.32"
INNER_IP, INNER_GW, INNER_NET = "10.88.0.2", "10.88.0.1", "10.88.0.0/24"
PORT, OPEN_PORT = 8080, 8081
CLIENT_PORTS = "32768 40000"  # ip_local_port_range forced on clients: every source port below the ACL's range

# Dual-stack: one socket for both families, IPv4 peers seen as ::ffff:a.b.c.d.
SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1]))); s.listen(64); print("ready", flush=True)
while True:
    c, peer = s.accept(); host = peer[0].removeprefix("::ffff:"); print(host, peer[1], flush=True)
    try: c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n")
    except OSError: pass
    c.close()
"""
# Like the demo's client, optionally bound to a source address.
BOUND_CLIENT = """
import socket, sys
try:
    host, port, timeout, source = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    s = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0)); data = b""
    while chunk := s.recv(4096): data += chunk
    sys.exit(0 if data.endswith(b"ok\\n") else 3)
except OSError:
    sys.exit(1)
"""


class AclNetwork:
    def __init__(self, near: Netns, *, low_ports: bool = True, near_if: str = "v-near", action: str = "REJECT",
                 inner: bool = False) -> None:
        self.near = near
        self.far = Netns("pgfar")
        self.inner: Netns | None = None
        self.peers: list[tuple[str, int]] = []  # (address, port) seen on PORT, behind the ACL
        self.open_peers: list[tuple[str, int]] = []  # seen on OPEN_PORT, no ACL
        near.run(["ip", "link", "add", near_if, "type", "veth", "peer", "name", "v-far", "netns", self.far.name])
        near.run(["ip", "addr", "add", f"{NEAR_IP}/24", "dev", near_if])
        near.run(["ip", "addr", "add", f"{SECONDARY_IP}/24", "dev", near_if])
        near.run(["ip", "-6", "addr", "add", f"{NEAR_IP6}/64", "dev", near_if, "nodad"])
        near.run(["ip", "link", "set", near_if, "up"])
        near.run(["ip", "route", "add", "default", "via", SERVER_IP])
        self.far.run(["ip", "addr", "add", f"{SERVER_IP}/24", "dev", "v-far"])
        self.far.run(["ip", "-6", "addr", "add", f"{SERVER_IP6}/64", "dev", "v-far", "nodad"])
        self.far.run(["ip", "link", "set", "v-far", "up"])
        # The ACL: stateless, like a NACL: only the source port decides.
        for tool in ("iptables-nft", "ip6tables-nft"):
            self.far.run([tool, "-A", "INPUT", "-p", "tcp", "--dport", str(PORT), "-m", "tcp", "!", "--sport",
                          f"{ACL_LOW}:65535", "-j", action,
                          *(["--reject-with", "tcp-reset"] if action == "REJECT" else [])])
        if low_ports:
            # Force the near side's own connections below the ACL's range.
            near.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 40000"])
        if inner:
            self._add_inner(near)
        self._servers = [self._serve(PORT, self.peers), self._serve(OPEN_PORT, self.open_peers)]

    def _add_inner(self, near: Netns) -> None:
        self.inner = Netns("pginner")
        near.run(["ip", "link", "add", "v-in", "type", "veth", "peer", "name", "v-inner", "netns", self.inner.name])
        near.run(["ip", "addr", "add", f"{INNER_GW}/24", "dev", "v-in"])
        near.run(["ip", "link", "set", "v-in", "up"])
        near.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.inner.run(["ip", "addr", "add", f"{INNER_IP}/24", "dev", "v-inner"])
        self.inner.run(["ip", "link", "set", "v-inner", "up"])
        self.inner.run(["ip", "route", "add", "default", "via", INNER_GW])
        self.inner.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 40000"])

    def _serve(self, port: int, into: list[tuple[str, int]]) -> subprocess.Popen[bytes]:
        proc = self.far.popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                host, port_text = line.decode().split()
                into.append((host, int(port_text)))

        threading.Thread(target=read, daemon=True).start()
        return proc

    @property
    def ports(self) -> list[int]:
        return [p for _, p in self.peers]

    def connect(self, timeout: float = 3.0, *, server: str = SERVER_IP, port: int = PORT, source: str | None = None,
                via: Netns | None = None) -> bool:
        """One connection from the near namespace's own stack (or ``via``); True when the server answered."""
        space = via or self.near
        argv = [sys.executable, "-c", BOUND_CLIENT, server, str(port), str(timeout), source] if source else [
            sys.executable, "-c", CLIENT, server, str(port), str(timeout)]
        seen = len(self.peers) + len(self.open_peers)
        ok = space.run(argv, check=False, timeout=timeout + 10).returncode == 0
        if ok:
            # The server's line about it is read on another thread: a caller looks at peers right after.
            wait_for(lambda: len(self.peers) + len(self.open_peers) > seen, 5)
        return ok

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.far.close()
