# syntax=docker/dockerfile:1
# GoldFinch Serve for a GPU node (NVIDIA Container Toolkit on the host):
#   docker build -t goldfinch-serve .
#   docker run --gpus all -p 8000:8000 goldfinch-serve
# Configure with GOLDFINCH_<OPTION> environment variables (see `goldfinch-serve --help`).
# Serve your own model: -v /srv/models:/models:ro -e GOLDFINCH_MODEL=/models/<folder>.
FROM nvidia/cuda:12.9.1-runtime-ubuntu24.04

# torch comes from the same install script as the README's commands and CI (scripts/setup.sh):
# these two build arguments are its GOLDFINCH_TORCH_VERSION and GOLDFINCH_TORCH_INDEX_URL. The CUDA
# build of the wheel index should match the base image's CUDA (cu129 <-> 12.9); for cu130 (driver
# >= 580) build with --build-arg GOLDFINCH_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130.
ARG GOLDFINCH_TORCH_VERSION=2.13.0
ARG GOLDFINCH_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129
ARG DEBIAN_FRONTEND=noninteractive

# Python 3.12 (Ubuntu 24.04's python3) with venv; gcc and the Python headers because Triton
# compiles its small kernel launchers with the system C compiler the first time a kernel runs.
# Versions come from the pinned base image's Ubuntu release; exact apt pins break with every
# security update, hence the ignore.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 goldfinch \
    && useradd --uid 10001 --gid goldfinch --create-home --shell /usr/sbin/nologin goldfinch \
    && mkdir -p /models /sessions /var/cache/goldfinch \
    && chown goldfinch:goldfinch /models /sessions /var/cache/goldfinch

WORKDIR /app
# The project (the .dockerignore keeps tests, caches, data and the host's .venv out).
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY engine/ engine/
COPY kernels/ kernels/
COPY server/ server/
COPY clients/ clients/
# The one install script: a venv in /app/.venv, torch (pinned, CUDA build) first, then the
# project editable (so it finds its demo model in /app/models/demo). The pip cache stays out of
# the image.
RUN --mount=type=cache,target=/root/.cache/pip bash scripts/setup.sh

# The built-in demo model, the default when GOLDFINCH_MODEL is not set (last: changes often).
COPY models/demo/ models/demo/

# Compiled kernels (Triton, torch.compile) are cached in one folder: mount a volume there and a
# restart finds them (H100, 1.5B shape, benchmarks/bench_startup.py: engine start 71 s with empty
# caches, 11 s with them; on a fresh start a 4,000- and then a 1,000-token prompt also waited 3-4 s
# each for compiles, 0.3 s or less with them). The caches are keyed by the code and versions that
# made them.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GOLDFINCH_HOST=0.0.0.0 \
    GOLDFINCH_PORT=8000 \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/goldfinch/inductor \
    TRITON_CACHE_DIR=/var/cache/goldfinch/triton

USER 10001:10001
EXPOSE 8000
# 200 when the model is loaded and the engine runs; 503 while loading or after the engine died.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GOLDFINCH_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["goldfinch-serve"]
