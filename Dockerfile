# A counterdb node. Build: docker build -t counterdb .
# Run:   docker run -p 8080:8080 -v counterdb-data:/data counterdb
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY counterdb ./counterdb
COPY twisted ./twisted

# Install (not editable, so twistd finds the plugin), then build Twisted's
# plugin cache as root: the non-root user cannot write it at run time.
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd counterdb --help > /dev/null \
    && useradd --system --create-home --home-dir /home/counterdb counterdb \
    && mkdir /data \
    && chown counterdb:counterdb /data \
    && rm -rf /src

USER counterdb
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# --pidfile= : twistd would otherwise write twistd.pid and, after a container
# restart, refuse to start because "PID 1" (itself) looks like a running twistd.
CMD ["twistd", "-n", "--pidfile=", "counterdb", "--port", "8080", "--data-dir", "/data"]
