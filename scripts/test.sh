#!/usr/bin/env bash
# The test command: lint, then the whole suite against real processes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
