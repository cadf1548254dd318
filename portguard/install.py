"""``portguard install-systemd``: put the unit and an example config where systemd looks."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from portguard.errors import FatalError

__all__ = ["install_systemd"]

UNIT_PATH = Path("etc/systemd/system/portguard.service")
CONFIG_PATH = Path("etc/portguard/portguard.toml")
DEFAULT_EXEC = "/opt/portguard/bin/portguard"


def _data(name: str) -> str:
    return resources.files("portguard").joinpath("data", name).read_text()


def install_systemd(root: Path, exec_path: str | None = None) -> list[Path]:
    """Write the unit (ExecStart pointing at ``exec_path``) and, if none exists, the example config."""
    program = exec_path or shutil.which("portguard") or str(Path(sys.argv[0]).resolve())
    if not Path(program).is_absolute():
        raise FatalError(f"--exec: {program!r} must be an absolute path")
    unit = _data("portguard.service").replace(f"ExecStart={DEFAULT_EXEC} run", f"ExecStart={program} run")
    written = []
    try:
        unit_file = root / UNIT_PATH
        unit_file.parent.mkdir(parents=True, exist_ok=True)
        unit_file.write_text(unit)
        unit_file.chmod(0o644)
        written.append(unit_file)
        config = root / CONFIG_PATH
        if not config.exists():
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(_data("portguard.toml"))
            config.chmod(0o644)
            written.append(config)
    except OSError as exc:
        raise FatalError(f"install-systemd: {exc.filename}: {exc.strerror}") from None
    return written
