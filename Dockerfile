# portguard as a privileged host-network container. systemd is the first choice (see README):
#   docker run -d --name portguard --network host --cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW \
#     --restart unless-stopped -v /var/run:/host-run:ro -e DOCKER_HOST=unix:///host-run/docker.sock portguard
#
# Build arguments exist for offline builds (the test suite has no registry): BASE is any Debian
# bookworm-like image, APT_PACKAGES may be emptied when BASE already carries them, PIP_ARGS can
# point pip at local wheels. The default build is the normal one.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG APT_PACKAGES="iptables nftables conntrack"
ARG PIP_ARGS=""

# Both iptables flavours (iptables-nft, iptables-legacy), libnftables and conntrack; portguard
# detects which one the host uses. Versions follow the base image's release.
# hadolint ignore=DL3008
RUN if [ -n "$APT_PACKAGES" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends $APT_PACKAGES \
        && rm -rf /var/lib/apt/lists/*; \
    fi

COPY . /src
# hadolint ignore=DL3013
RUN python3 -m venv /opt/portguard \
    && /opt/portguard/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_ARGS /src \
    && rm -rf /src

ENV PATH="/opt/portguard/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 CMD ["portguard", "check"]
ENTRYPOINT ["portguard", "run"]
