# mgeo-service image: CPU by default.
#   docker build -t mgeo-service .
# CUDA: a CUDA runtime base and the matching torch wheel index, e.g.
#   docker build -t mgeo-service:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
# Not built in CI (no Docker engine there); tests/test_deploy.py checks the paths it copies.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

# CUDA bases come without Python; the python image has it.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/tmp

RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}

WORKDIR /app
COPY setup.cfg pyproject.toml README.md gunicorn.conf.py /app/
COPY mgeo_service /app/mgeo_service
# Editable: `mgeo-service serve` runs Gunicorn with /app/gunicorn.conf.py beside the package.
RUN pip install --no-cache-dir -e /app

RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin mgeo
USER 10001

EXPOSE 5000 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health/live', timeout=4)"
CMD ["mgeo-service", "serve"]
