# The appliance as a container image (Cloud Run, App Runner, Fargate, Kubernetes).
#   docker build -t derm-appliance .
#   docker run -p 8000:8000 -v /srv/models/ham10000-resnet50:/models:ro \
#       -v appliance-data:/data -e API_KEY=... derm-appliance
# The model directory is mounted at /models (or baked in: see the end of docs/containers.md).
# Liveness: GET /health. Readiness (orchestrators): GET /ready, 200 once the
# model is self-checked and the store answers, else 503.
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY appliance /src/appliance
COPY convert /src/convert
# Without the convert extra: the image never runs PyTorch.
RUN python3 -m venv /opt/appliance/venv \
    && /opt/appliance/venv/bin/pip install --no-cache-dir /src \
    && /opt/appliance/venv/bin/python -m compileall -q /opt/appliance/venv

FROM ${BASE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin appliance \
    && install -d -o appliance -g appliance -m 0700 /data /cache
COPY --from=build /opt/appliance/venv /opt/appliance/venv
COPY deploy/container.toml /etc/appliance/config.toml
USER 10001:10001
ENV PATH=/opt/appliance/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8000
# /health answers as soon as the server listens; python is in the image, curl is not.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
# SIGTERM drains in-flight requests (server.shutdown_timeout_s) and exits 0;
# give the container a stop timeout above that (docker stop -t 30).
STOPSIGNAL SIGTERM
ENTRYPOINT ["appliance"]
CMD ["serve", "--config", "/etc/appliance/config.toml"]
