#!/usr/bin/env bash
# Install portguard on this host and start it under systemd (Debian/Ubuntu).
#   ./scripts/install.sh            (re-runs itself with sudo when not root)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then exec sudo "$0" "$@"; fi
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
