# portguard as a privileged host-network container. systemd is the first choice (see README):
#   docker run -d --name portguard --network host --cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW \
#     --restart unless-stopped -v /var/run:/host-run:ro -e DOCKER_HOST=unix:///host-run/docker.sock portguard
#
# Build arguments exist for offline builds (the test suite has no registry): BASE is any Debian
# bookworm-like image with python3-venv, APT_PACKAGES may be emptied when BASE already carries them,
# PIP_ARGS can point pip at local wheels. The default build is the normal one.
ARG BASE=python:3.11-slim-bookworm

# ---- build: the virtual environment, from the source tree (which stays in this stage) ----
FROM ${BASE} AS build
ARG PIP_ARGS=""
# python-iptables is published as source only: its C wrapper needs a compiler (this stage is thrown away; the
# python:*-slim images carry Python's headers). Empty it when PIP_ARGS points at prebuilt wheels.
ARG BUILD_PACKAGES="gcc libc6-dev"
# hadolint ignore=DL3008
RUN if [ -n "$BUILD_PACKAGES" ] && ! command -v gcc >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends $BUILD_PACKAGES \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY . /src
# hadolint ignore=DL3013
RUN python3 -m venv /opt/portguard \
    && /opt/portguard/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_ARGS /src \
    && /opt/portguard/bin/python -m pip uninstall --yes --quiet pip setuptools wheel

# ---- final: the base, the netfilter tools, the environment; no source tree, no pip ----
FROM ${BASE}
ARG APT_PACKAGES="iptables nftables conntrack iproute2"
ARG VERSION=0.2.0
ARG SOURCE_URL=""

LABEL org.opencontainers.image.title="portguard" \
      org.opencontainers.image.description="Keeps source ports of outgoing connections inside a stateless ACL's range on Docker hosts, and changes nothing else" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}"

# Both iptables flavours (iptables-nft, iptables-legacy), libnftables, conntrack (the fallback where ctnetlink is
# refused) and iproute2 (the audit's routes); portguard detects which flavour the host uses. Versions follow the
# base image's release.
# hadolint ignore=DL3008
RUN if [ -n "$APT_PACKAGES" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends $APT_PACKAGES \
        && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man; \
    fi

COPY --from=build /opt/portguard /opt/portguard

ENV PATH="/opt/portguard/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 CMD ["portguard", "check"]
ENTRYPOINT ["portguard", "run"]
