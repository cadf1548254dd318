#!/usr/bin/env bash
# Install portguard on this host and start it under systemd (Debian 12+, Ubuntu 22.04+), from a checkout of
# this repository: the package in /opt/portguard, `portguard` on the PATH, shell completion, the man page
# and the unit.
#   ./scripts/install.sh            (re-runs itself with sudo when not root)
#
# python-iptables (the legacy-iptables backend's binding of libiptc) is published on PyPI as source only:
# installing it compiles a small C wrapper.  Minimal cloud images have no compiler, so the compiler and the
# Python headers are installed for the build when they are missing, and exactly the packages this script
# added are purged again afterwards.
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
prefix=/opt/portguard

installed_packages() { dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' | awk '$1 == "ii" {print $2}' | sort; }

# apt only when something is missing: a re-install (an upgrade) needs no package index.
needed=(iptables nftables conntrack iproute2 python3 python3-venv)
missing=$(comm -13 <(installed_packages) <(printf '%s\n' "${needed[@]}" | sort) | tr '\n' ' ')
if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086  # a list of package names
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The build of python-iptables needs a C compiler and Python.h, unless a previous install already built it; note
# what was there before adding them.
added=""
if ! "$prefix/bin/python" -I -c 'import importlib.metadata as m; m.version("python-iptables")' 2>/dev/null \
    && { ! command -v gcc >/dev/null || ! python3 -I -c 'import os, sysconfig
raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; }; then
    before=$(installed_packages)
    echo "install.sh: installing a C compiler and the Python headers to build python-iptables (removed afterwards)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev >/dev/null
    added=$(comm -13 <(echo "$before") <(installed_packages) | tr '\n' ' ')
fi
remove_build_packages() {
    if [ -n "$added" ]; then
        # shellcheck disable=SC2086  # a list of package names
        apt-get purge -y -qq $added >/dev/null && echo "install.sh: removed the build packages again"
        added=""
    fi
}
trap remove_build_packages EXIT

[ -x "$prefix/bin/python" ] || python3 -m venv "$prefix"
"$prefix/bin/pip" install --quiet --disable-pip-version-check --upgrade "$here"
remove_build_packages
trap - EXIT
ln -sf "$prefix/bin/portguard" /usr/local/bin/portguard

# Shell completion and the man page, both generated from portguard's own parser.  Python runs isolated (-I):
# from the checkout's root a plain `python -c` would import the checkout's portguard/, which has no man page.
mkdir -p /usr/share/bash-completion/completions /usr/share/zsh/vendor-completions \
    /usr/share/fish/vendor_completions.d /usr/local/share/man/man1
"$prefix/bin/portguard" completion bash >/usr/share/bash-completion/completions/portguard
"$prefix/bin/portguard" completion zsh >/usr/share/zsh/vendor-completions/_portguard
"$prefix/bin/portguard" completion fish >/usr/share/fish/vendor_completions.d/portguard.fish
page=$("$prefix/bin/python" -I -c 'import pathlib, portguard; print(pathlib.Path(portguard.__file__).parent / "data/portguard.1")')
install -m 0644 "$page" /usr/local/share/man/man1/portguard.1
if command -v mandb >/dev/null; then mandb -q || true; fi
"$prefix/bin/portguard" install-systemd --exec "$prefix/bin/portguard"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable portguard.service
    systemctl restart portguard.service  # a re-install runs the new version (the standby bridges the restart)
    systemctl --no-pager --lines=5 status portguard.service || true
    "$prefix/bin/portguard" check || true
else
    echo "systemd is not running here: start it with  $prefix/bin/portguard run" >&2
fi
