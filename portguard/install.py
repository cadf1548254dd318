"""``portguard install-systemd``: put the unit and an example config where systemd looks."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from portguard.errors import ConfigError, FatalError

__all__ = ["install_systemd", "this_program"]

UNIT_PATH = Path("etc/systemd/system/portguard.service")
CONFIG_PATH = Path("etc/portguard/portguard.toml")
DEFAULT_EXEC = "/opt/portguard/bin/portguard"


def _data(name: str) -> str:
    return resources.files("portguard").joinpath("data", name).read_text()


def _path(value: str, what: str) -> str:
    """A path that goes into a unit file: absolute, no control character (a newline would add directives), and
    no character systemd would read as a specifier or quote."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{what}: {value!r} contains a control character")
    if any(c in value for c in "%\"'\\ "):
        raise ConfigError(f"{what}: {value!r} contains a space, a quote, a backslash or '%'")
    if not Path(value).is_absolute():
        raise ConfigError(f"{what}: {value!r} must be an absolute path")
    return value


def this_program() -> str:
    """The command line that runs this very portguard: its script, or its Python with ``-m portguard``."""
    script = Path(sys.argv[0])
    if script.name == "portguard" and script.is_file():
        return _path(str(script.resolve()), "--exec")  # a link such as /usr/local/bin/portguard: its target
    return _path(sys.executable, "--exec") + " -m portguard"


def install_systemd(root: Path, exec_path: str | None = None, *, force: bool = False) -> list[str]:
    """Write the unit (ExecStart and ExecReload run ``exec_path``, by default this portguard) and, if none
    exists, the example config.

    A unit that differs from what would be written (an operator edited it) is kept unless ``force``.
    Returns one line per file: what was done with it.
    """
    _path(str(root), "--root")
    program = _path(exec_path, "--exec") if exec_path else this_program()
    unit = _data("portguard.service").replace(f"={DEFAULT_EXEC} ", f"={program} ")
    done = []
    try:
        unit_file = root / UNIT_PATH
        if unit_file.exists() and unit_file.read_text() != unit and not force:
            done.append(f"kept {unit_file} (edited; --force replaces it)")
        else:
            unit_file.parent.mkdir(parents=True, exist_ok=True)
            unit_file.write_text(unit)
            unit_file.chmod(0o644)
            done.append(f"installed {unit_file}")
        config = root / CONFIG_PATH
        if not config.exists():
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(_data("portguard.toml"))
            config.chmod(0o644)
            done.append(f"installed {config}")
    except OSError as exc:
        raise FatalError(f"install-systemd: {exc.filename}: {exc.strerror}") from None
    return done
