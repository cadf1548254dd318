#!/usr/bin/env bash
# Install portguard on this host and start it under systemd (Debian/Ubuntu), from a checkout of this
# repository: the package, shell completion and the man page.
#   ./scripts/install.sh            (re-runs itself with sudo when not root)
set -euo pipefail
# Refuse to run from a pipe or from anywhere but a checkout: it would install whatever directory it is in.
script=${BASH_SOURCE[0]:-}
if [ -z "$script" ] || [ ! -f "$script" ]; then
    echo "install.sh: run it from a checkout of portguard (./scripts/install.sh), not from a pipe" >&2
    exit 2
fi
here=$(cd "$(dirname "$script")/.." && pwd)
if [ ! -f "$here/pyproject.toml" ] || ! grep -q '^name = "portguard"$' "$here/pyproject.toml" \
        || [ ! -f "$here/portguard/__init__.py" ]; then
    echo "install.sh: $here is not a checkout of portguard" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then exec sudo "$script" "$@"; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends iptables nftables conntrack python3 python3-venv >/dev/null
python3 -m venv /opt/portguard
/opt/portguard/bin/pip install --quiet --upgrade "$here"
/opt/portguard/bin/portguard install-systemd --exec /opt/portguard/bin/portguard
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now portguard.service
    systemctl --no-pager --lines=5 status portguard.service || true
else
    echo "systemd is not running here: start it with  /opt/portguard/bin/portguard run" >&2
fi
/opt/portguard/bin/portguard check || true
