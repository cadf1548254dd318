"""The platform matrix on Debian trixie (the cases: tests/platform_cases.py)."""

import platform_cases as cases

pytestmark = cases.MARKS
stack = cases.stack_fixture("trixie")
globals().update({case.__name__: case for case in cases.CASES})  # in the order the cases must run
