#!/usr/bin/env bash
# Creates .venv (once) and installs prefork with its serve, dev, proctitle, metrics and reload extras from
# pyproject.toml
# (again whenever pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    for c in python3 python3.13 python3.12 python3.11 python3.10; do
      if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then PY=$c; break; fi
    done
  fi
  [ -n "$PY" ] || { echo "setup: Python 3.10+ not found (set PYTHON=/path/to/python3)" >&2; exit 1; }
  "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing prefork and its extras into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -m pip install -q -e '.[serve,dev,proctitle,metrics,reload]'
  touch "$stamp"
fi
