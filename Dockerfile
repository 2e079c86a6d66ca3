# syntax=docker/dockerfile:1
#
# Sluice container image: a slim Python runtime, a virtualenv built in a
# separate stage, no compilers, a non-root user, a health check.
#
#   docker build -t sluice .
#   docker run -p 4000:4000 -p 4001:4001 sluice                      # demo model, defaults
#   docker run -v $PWD/my.yaml:/etc/sluice/sluice.yaml:ro -e OPENAI_API_KEY sluice
#
# Configuration: the file at $SLUICE_CONFIG (default /etc/sluice/sluice.yaml;
# mount yours there), and any setting from the environment as
# SLUICE__SECTION__FIELD (e.g. SLUICE__SERVER__WORKERS=4), which wins over the
# file. State (SQLite ledger, keys, cache) lives under /var/lib/sluice.
# See docs/deploy.md.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
# Optional dependency groups from pyproject.toml: 'pii' (Presidio pattern
# recognizers), 'tokenizers' (exact prompt counts), 'ner' (spaCy model).
ARG SLUICE_EXTRAS=pii,tokenizers
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/sluice
WORKDIR /src
# Metadata first: the dependency layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir -p proxy plugins && touch proxy/__init__.py plugins/__init__.py \
 && /opt/sluice/bin/pip install ".[${SLUICE_EXTRAS}]" \
 && /opt/sluice/bin/pip uninstall -y sluice
COPY proxy ./proxy
COPY plugins ./plugins
# The stub build's leftovers must not leak into this one.
RUN rm -rf build ./*.egg-info \
 && /opt/sluice/bin/pip install --no-deps ".[${SLUICE_EXTRAS}]" \
 && /opt/sluice/bin/sluice check /src/proxy/default.yaml

FROM python:${PYTHON_VERSION}-slim AS runtime
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Observability and governance sidecar for OpenAI-compatible LLM traffic" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sluice --no-create-home --shell /usr/sbin/nologin sluice \
 && mkdir -p /etc/sluice /var/lib/sluice \
 && chown 10001:10001 /var/lib/sluice
COPY --from=build /opt/sluice /opt/sluice
COPY contrib/deploy/docker/sluice.yaml /etc/sluice/sluice.yaml
ENV PATH=/opt/sluice/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SLUICE_CONFIG=/etc/sluice/sluice.yaml \
    SLUICE_HEALTHCHECK_URL=http://127.0.0.1:4001/healthz
WORKDIR /var/lib/sluice
USER 10001:10001
# 4000: client traffic; 4001: admin API, /healthz, /readyz, /metrics
EXPOSE 4000 4001
VOLUME ["/var/lib/sluice"]
# Liveness only (the process answers); readiness, which also needs the
# upstreams and Redis, is /readyz for orchestrators that distinguish the two.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['SLUICE_HEALTHCHECK_URL'], timeout=2).status == 200 else 1)"]
# SIGTERM drains in-flight requests and streams for server.drain_seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sluice"]
CMD ["serve"]
