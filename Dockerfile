# Civitas hub image: `civitas db upgrade`, then `civitas serve` (gunicorn, several workers)
# on PostgreSQL and Redis. Operators' guide: deploy/README.md. Build: docker build -t civitas .
#
# No secret, key or settings file is baked in: settings come from a mounted YAML file
# ($CIVITAS_CONFIG) and CIVITAS_* variables; secrets from files through CIVITAS_*_FILE
# (see deploy/docker-entrypoint.sh) or the *_file keys of the settings file.

# --- build: install the project and its runtime dependencies into a virtualenv -------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# gcc and OpenSSL's headers build the ledger's hashing core (consent/ledger/_hashing.c, linked
# to libcrypto.so.3, which the runtime image has); they stay in this stage
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/civitas

WORKDIR /src
# pyproject.toml names README.md as the package's readme: the build needs it
COPY pyproject.toml setup.py README.md ./
COPY kernel/ kernel/
COPY config/ config/
COPY connectors/ connectors/
COPY broker/ broker/
COPY idp/ idp/
COPY consent/ consent/
COPY civitas/ civitas/
# runtime dependencies only (no [test] extra); the import check fails the build if the
# hashing core was skipped. It runs from / : in /src, the source tree (without the built
# module) would shadow the installed package and the check would always fail.
RUN /opt/civitas/bin/pip install . \
    && cd / && /opt/civitas/bin/python -c "import consent.ledger._hashing"

# --- runtime: the virtualenv, the entry point, an unprivileged user ------------------------
FROM python:3.11-slim-bookworm

RUN groupadd --system --gid 10001 civitas \
    && useradd --system --uid 10001 --gid civitas --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin civitas

COPY --from=build /opt/civitas /opt/civitas
# plain COPY + chmod (not COPY --chmod, which needs BuildKit): the image builds with the
# classic builder, BuildKit, podman or buildah, and offline (no dockerfile frontend to pull)
COPY deploy/docker-entrypoint.sh /usr/local/bin/civitas-entrypoint
RUN chmod 0755 /usr/local/bin/civitas-entrypoint

ENV PATH=/opt/civitas/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CIVITAS_CONFIG=/etc/civitas/civitas.yaml

# The settings file is mounted at /etc/civitas/civitas.yaml (read-only). The hub writes only
# to /tmp (gunicorn's worker heartbeats, the metrics of each worker).
WORKDIR /opt/civitas
USER 10001:10001
EXPOSE 8000

# liveness of the worker processes; /readyz also checks the database, Redis and the keys
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["civitas-entrypoint"]
CMD ["civitas", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "4", "--threads", "4"]
