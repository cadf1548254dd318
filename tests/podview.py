"""A DaemonSet container's file system view, from the manifest itself, for a process on this machine.

The view is a chroot assembled in a private mount namespace (a holder process keeps it): this machine's
programs and libraries read-only, /proc, /sys and /dev as they are, /etc as an overlay (so that mount points
can be made without touching this machine's /etc), then every volumeMount of the manifest (configMap: its
files; emptyDir: a tmpfs; hostPath: a directory of the test's fake node), and the root file system
read-only when the manifest says so.  Nothing is mounted in this machine's own mount namespace.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netns import Netns

__all__ = ["PodView"]

# What the chroot shows of this machine, read-only: programs, libraries, Python (a pyenv in /root, say), the
# checkout (its .venv) and /tmp (the tests' sockets).
_SHARED = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "opt", "var", "root", "srv", "tmp", "work")


class PodView:
    def __init__(self, container: dict[str, Any], volumes: list[dict[str, Any]], configmaps: dict[str, dict[str, str]],
                 *, node: Path, work: Path, extra: Sequence[Path] = ()) -> None:
        """``node``: the fake node's root (hostPath sources live below it); ``extra``: more paths to share."""
        self.root = work / "pod-root"
        script = ["set -e", f"R={shlex.quote(str(self.root))}", 'mkdir -p "$R"', 'mount -t tmpfs tmpfs "$R"']
        shared = [*_SHARED, *(str(p).lstrip("/") for p in extra)]
        for top in dict.fromkeys(shared):
            if (Path("/") / top).exists():
                script += [f'mkdir -p "$R/{top}"', f'mount --rbind "/{top}" "$R/{top}"',
                           f'mount -o remount,bind,ro "$R/{top}"']
        for top in ("proc", "sys", "dev"):
            script += [f'mkdir -p "$R/{top}"', f'mount --rbind /{top} "$R/{top}"']
        script.append('mkdir -p "$R/run"')  # the image's own /run: part of the root file system
        # The image has none of this machine's runtimes (its podman, say).
        script.append('p=$(command -v podman) && mount --bind /dev/null "$R$p" || true')
        (work / "etc-layer").mkdir(parents=True, exist_ok=True)
        script += [f'mount -t tmpfs tmpfs "{work}/etc-layer"', f'mkdir -p "{work}/etc-layer/u" "{work}/etc-layer/w"',
                   'mkdir -p "$R/etc"',
                   f'mount -t overlay overlay -o lowerdir=/etc,upperdir={work}/etc-layer/u,workdir={work}/etc-layer/w '
                   '"$R/etc"']
        by_name = {v["name"]: v for v in volumes}
        for mount in sorted(container.get("volumeMounts", []), key=lambda m: m["mountPath"].count("/")):
            script += self._volume(mount, by_name[mount["name"]], configmaps, node, work)
        script.append('mount -o remount,ro "$R/etc"')
        if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
            script.append('mount -o remount,ro "$R"')
        script += ["echo ready", "exec sleep infinity"]
        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(script)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline() != "ready\n":
            self.holder.wait(10)
            raise AssertionError(self.holder.stderr.read() if self.holder.stderr else "the pod view was not built")

    @staticmethod
    def _volume(mount: dict[str, Any], volume: dict[str, Any], configmaps: dict[str, dict[str, str]], node: Path,
                work: Path) -> list[str]:
        target = f'"$R{mount["mountPath"]}"'
        if "configMap" in volume:
            source = work / f"configmap-{volume['name']}"
            source.mkdir(parents=True, exist_ok=True)
            for name, text in configmaps[volume["configMap"]["name"]].items():
                (source / name).write_text(text)
            lines = [f"mkdir -p {target}", f'mount --bind "{source}" {target}']
        elif "emptyDir" in volume:
            lines = [f"mkdir -p {target}", f"mount -t tmpfs tmpfs {target}"]
        elif "hostPath" in volume:
            source = node / volume["hostPath"]["path"].lstrip("/")
            if volume["hostPath"].get("type") == "FileOrCreate":
                source.parent.mkdir(parents=True, exist_ok=True)
                source.touch()
                lines = [f'mkdir -p "$(dirname {target})"', f"touch {target}"]
            else:
                source.mkdir(parents=True, exist_ok=True)
                lines = [f"mkdir -p {target}"]
            lines.append(f'mount --bind "{source}" {target}')
        else:
            raise AssertionError(f"volume kind not simulated: {volume}")
        if mount.get("readOnly"):
            lines.append(f"mount -o remount,bind,ro {target}")
        return lines

    def argv(self, cmd: Sequence[str], *, ns: Netns, env: dict[str, str]) -> list[str]:
        """``cmd`` in the pod view, in the node's network namespace (hostNetwork), with exactly ``env``."""
        variables = [f"{k}={v}" for k, v in env.items()]
        return ["nsenter", "-t", str(self.holder.pid), "-m", f"--net={ns.path}", "chroot", str(self.root),
                "/usr/bin/env", "-i", *variables, *cmd]

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)
