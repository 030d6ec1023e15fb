#!/usr/bin/env bash
# Set up (idempotent) and start the server on its built-in model. Extra arguments go to
# goldfinch-serve (see `goldfinch-serve --help`); every option also reads GOLDFINCH_<OPTION>.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/goldfinch-serve "$@"
