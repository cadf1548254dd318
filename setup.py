"""Build step that pyproject.toml cannot express: the man page, generated from the CLI's own parser.

argparse-manpage turns ``portguard.parser.build_parser()`` into ``portguard/data/portguard.1`` while the
package is built, so the page ships inside every wheel and always matches the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def render_manpage() -> str:
    from argparse_manpage.manpage import Manpage

    sys.path.insert(0, str(HERE))
    from portguard.parser import build_parser

    page = Manpage(build_parser(), _data={"project_name": "portguard", "url": "", "authors": [],
                                          "description": "keep source ports inside a stateless ACL's range"})
    return str(page)


class BuildPyWithManpage(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "portguard" / "data" / "portguard.1"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render_manpage())


setup(cmdclass={"build_py": BuildPyWithManpage})
