"""The platform matrix on Debian sid (the cases: tests/platform_cases.py)."""

import platform_cases as cases

pytestmark = cases.MARKS
stack = cases.stack_fixture("sid")
globals().update({case.__name__: case for case in cases.CASES})  # in the order the cases must run
test_routed_network_keeps_the_container_address = cases.test_routed_network_keeps_the_container_address  # Docker >= 27
