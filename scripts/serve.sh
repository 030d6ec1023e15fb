#!/usr/bin/env bash
# Set up (idempotent) and run the project's main job. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m engine.demo "$@"
