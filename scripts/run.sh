#!/usr/bin/env bash
# The main job: the seed's hello world on every core (Ctrl-C stops it gracefully).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python examples/hello_cluster.py "$@"
