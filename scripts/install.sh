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
ln -sf /opt/portguard/bin/portguard /usr/local/bin/portguard
# Shell completion and the man page, both generated from portguard's own parser.
mkdir -p /usr/share/bash-completion/completions /usr/share/zsh/vendor-completions \
    /usr/share/fish/vendor_completions.d /usr/local/share/man/man1
/opt/portguard/bin/portguard completion bash >/usr/share/bash-completion/completions/portguard
/opt/portguard/bin/portguard completion zsh >/usr/share/zsh/vendor-completions/_portguard
/opt/portguard/bin/portguard completion fish >/usr/share/fish/vendor_completions.d/portguard.fish
page=$(/opt/portguard/bin/python -c 'import pathlib, portguard; print(pathlib.Path(portguard.__file__).parent / "data/portguard.1")')
install -m 0644 "$page" /usr/local/share/man/man1/portguard.1
if command -v mandb >/dev/null; then mandb -q || true; fi
/opt/portguard/bin/portguard install-systemd --exec /opt/portguard/bin/portguard
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now portguard.service
    systemctl --no-pager --lines=5 status portguard.service || true
else
    echo "systemd is not running here: start it with  /opt/portguard/bin/portguard run" >&2
fi
/opt/portguard/bin/portguard check || true
