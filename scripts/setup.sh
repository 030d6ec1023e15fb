#!/usr/bin/env bash
# One idempotent set-up for every README command: a virtual environment in .venv with the project
# installed (editable). A second run only re-installs when pyproject.toml changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GOLDFINCH_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.goldfinch-setup"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: where a local CPU wheel is offered (this workplace), this takes it; the
# project's own range then keeps it instead of pulling a multi-GB CUDA build.
# GOLDFINCH_TORCH_INDEX_URL (optional) is the index torch comes from, e.g. a CUDA build's
# https://download.pytorch.org/whl/cu129 (the Dockerfile sets it); unset, pip's configured index.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    pip install "torch==${GOLDFINCH_TORCH_VERSION:-2.13.0}" \
        ${GOLDFINCH_TORCH_INDEX_URL:+--index-url "$GOLDFINCH_TORCH_INDEX_URL"}
fi
extras=test
# a CPU torch: add Triton for the kernels' interpreter tests (a CUDA torch pins its own Triton)
if "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
    extras=test,interpreter
fi
pip install -e ".[$extras]"
echo "$want" > "$stamp"
