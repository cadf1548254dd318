"""The unit under Debian bookworm's own systemd (the cases: tests/systemd_cases.py)."""

import systemd_cases as cases

pytestmark = cases.MARKS
unit = cases.unit_fixture("bookworm")
globals().update({case.__name__: case for case in cases.CASES})  # in the order the cases must run
