"""The platform matrix on Debian sid (the cases: tests/platform_cases.py), with what only its stack has."""

import platform_cases as cases

pytestmark = cases.MARKS
stack = cases.stack_fixture("sid")
globals().update({case.__name__: case for case in cases.CASES})  # in the order the cases must run
# Docker >= 27 (gateway_mode_ipv4=routed) and Podman 5 with netavark's nftables driver:
test_routed_network_keeps_the_container_address = cases.test_routed_network_keeps_the_container_address
test_podman_runs_builds_and_host_to_container = cases.test_podman_runs_builds_and_host_to_container
