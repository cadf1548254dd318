"""A stateless ACL in front of a server, like an AWS NACL: TCP from source ports < 49152 is rejected.

    [near namespace] v-near 198.51.100.1 --- 198.51.100.2 v-far [far namespace: ACL + server]

The near namespace is the "host" portguard protects; the far one records the source port of
every connection it accepts.
"""

from __future__ import annotations

import subprocess
import sys
import threading

from netns import Netns

from portguard.demo import CLIENT, SERVER

__all__ = ["ACL_LOW", "AclNetwork"]

ACL_LOW = 49152
SERVER_IP = "198.51.100.2"
NEAR_IP = "198.51.100.1"
PORT = 8080


class AclNetwork:
    def __init__(self, near: Netns, *, low_ports: bool = True, near_if: str = "v-near", action: str = "REJECT") -> None:
        self.near = near
        self.far = Netns("pgfar")
        self.ports: list[int] = []
        near.run(["ip", "link", "add", near_if, "type", "veth", "peer", "name", "v-far", "netns", self.far.name])
        near.run(["ip", "addr", "add", f"{NEAR_IP}/24", "dev", near_if])
        near.run(["ip", "link", "set", near_if, "up"])
        near.run(["ip", "route", "add", "default", "via", SERVER_IP])
        self.far.run(["ip", "addr", "add", f"{SERVER_IP}/24", "dev", "v-far"])
        self.far.run(["ip", "link", "set", "v-far", "up"])
        # The ACL: stateless, like a NACL: only the source port decides.
        self.far.run(
            [
                "iptables-nft",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                str(PORT),
                "-m",
                "tcp",
                "!",
                "--sport",
                f"{ACL_LOW}:65535",
                "-j",
                action,
                *(["--reject-with", "tcp-reset"] if action == "REJECT" else []),
            ]
        )
        if low_ports:
            # Force the near side's own connections below the ACL's range.
            near.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 40000"])
        # the demo's own server and client: one implementation of "a server that records source ports"
        self._server = self.far.popen([sys.executable, "-c", SERVER, SERVER_IP, str(PORT)], stdout=subprocess.PIPE)
        assert self._server.stdout is not None and self._server.stdout.readline() == b"ready\n"
        self._reader = threading.Thread(target=self._read_ports, daemon=True)
        self._reader.start()

    def _read_ports(self) -> None:
        assert self._server.stdout is not None
        for line in self._server.stdout:
            self.ports.append(int(line))

    def connect(self, timeout: float = 3.0) -> bool:
        """One connection from the near namespace's own stack; True when the server answered."""
        proc = self.near.run(
            [sys.executable, "-c", CLIENT, SERVER_IP, str(PORT), str(timeout)], check=False, timeout=timeout + 10
        )
        return proc.returncode == 0

    def close(self) -> None:
        self.far.close()
