"""Container images without a registry: a root file system with the static pgnet client/server (tests/pgnet.c),
built with this machine's gcc, as a tar for `podman import` / `docker import`."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import tarfile
from pathlib import Path

from userland import CACHE

__all__ = ["PGNET_IMAGE", "PODMAN_CONF", "pgnet_binary", "pgnet_tar"]

HERE = Path(__file__).resolve().parent
PGNET_IMAGE = "localhost/pg-pgnet:latest"
# containers.conf for a rootful Podman in a test namespace: runc and cgroupfs (no systemd to ask), events to a file,
# and fixed ulimits, so that a container's limits do not follow what the test process inherited.  Ends inside
# [engine]: a test may add engine keys, then sections of its own.
PODMAN_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def pgnet_binary(cache: Path = CACHE) -> Path:
    """The static binary, built once per source version (gcc -static; glibc's static libc from libc6-dev)."""
    source = HERE / "pgnet.c"
    key = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = cache / f"pgnet-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "pgnet.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            partial = binary.with_suffix(".partial")
            subprocess.run(["gcc", "-static", "-O2", "-o", str(partial), str(source)], check=True, timeout=120)
            partial.rename(binary)
    return binary


def pgnet_tar(dest: Path) -> Path:
    """A root file system holding /pgnet (and /tmp), as a tar."""
    tar_path = dest / "pgnet-rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("tmp")
        info.type, info.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(info)
        tar.add(pgnet_binary(), "pgnet")
    return tar_path
