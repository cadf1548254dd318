#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages, the Python package in .venv),
# then lint, types, unit and integration tests, the platform matrix included. Integration tests
# run only inside network namespaces they create and remove. The matrix's Debian userlands are
# made once and cached in /var/cache/portguard-test (PG_TEST_CACHE moves it).
#   ./scripts/test.sh [pytest args]      (re-runs itself with sudo when not root)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then exec sudo -E "$0" "$@"; fi

# systemd-container: systemd-nspawn boots the matrix's userlands; podman, netavark and containernetworking-plugins
# are the other runtimes portguard knows (Debian 12's podman 4.3 with netavark 1.4, the CNI plugins 1.1).
# gcc and libc6-dev build the tests' static client (tests/pgnet.c).
packages=(iptables nftables conntrack docker.io busybox-static iproute2 util-linux systemd systemd-container
          python3 python3-venv debootstrap prometheus man-db podman netavark containernetworking-plugins
          gcc libc6-dev jq)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Installing docker.io must not start a dockerd in this host's own network namespace:
    # policy-rc.d 101 tells the maintainer scripts not to start services.
    policy=/usr/sbin/policy-rc.d
    created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$created_policy" ]; then rm -f "$policy"; trap - EXIT; fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
echo "== ruff";  .venv/bin/ruff check portguard tests bench
echo "== mypy";  .venv/bin/mypy
echo "== pytest"
# Files run in parallel, each whole on one worker (its module-wide dockerd or userland made once; the platform
# matrix has a file per userland); most of the suite waits on the kernel, dockerd and the registry, not on the
# two cores.
exec .venv/bin/pytest -n "${PG_TEST_WORKERS:-4}" --dist loadfile "$@"
