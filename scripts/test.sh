#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages, the Python package in .venv),
# then lint, types, unit and integration tests. Integration tests run only inside network
# namespaces they create and remove.
#   ./scripts/test.sh [pytest args]      (re-runs itself with sudo when not root)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then exec sudo -E "$0" "$@"; fi

packages=(iptables nftables conntrack docker.io busybox-static iproute2 util-linux systemd
          python3 python3-venv debootstrap prometheus man-db)
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
exec .venv/bin/pytest "$@"
