# A counterdb node. Build: docker build -t counterdb .
# Run:   docker run -p 8080:8080 -v counterdb-data:/data counterdb
# Configure it with COUNTERDB_* variables (docker run -e COUNTERDB_ACTORS=...),
# one per option of `twistd counterdb` (docs/operations.md); deploy/compose.yaml
# runs three nodes.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid and gid, 10001: a secret file prepared outside the image
# (deploy/compose.yaml) and Kubernetes' runAsNonRoot check name it.
RUN groupadd --system --gid 10001 counterdb \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/counterdb counterdb \
    && mkdir /data \
    && chown counterdb:counterdb /data

# The dependencies first, in their own layer, at the exact versions of
# deploy/constraints.txt: a change to counterdb's code does not reinstall them.
COPY deploy/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -r /tmp/constraints.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY counterdb ./counterdb
COPY twisted ./twisted

# Install (not editable, so twistd finds the plugin), then build Twisted's
# plugin cache as root: the non-root user cannot write it at run time.
RUN pip install --no-cache-dir -c /tmp/constraints.txt . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd counterdb --help > /dev/null \
    && rm -rf /src /tmp/constraints.txt

# Numeric, so that Kubernetes can check runAsNonRoot against it.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
ENV COUNTERDB_PORT=8080 \
    COUNTERDB_DATA_DIR=/data

# GET /health answers 200 whenever the node serves HTTP (slim has no curl).
# It asks 127.0.0.1 on COUNTERDB_PORT over plain HTTP: with TLS, an endpoint
# description in COUNTERDB_PORT or COUNTERDB_INTERFACE set, override it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('COUNTERDB_PORT', '8080') + '/health', timeout=4)"]

# --pidfile= : twistd would otherwise write twistd.pid and, after a container
# restart, refuse to start because "PID 1" (itself) looks like a running twistd.
# Every node option comes from the COUNTERDB_* environment.
CMD ["twistd", "-n", "--pidfile=", "counterdb"]
