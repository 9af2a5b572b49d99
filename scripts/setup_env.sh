#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with the pinned packages.
# Idempotent: does nothing when requirements.txt and pyproject.toml are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.deeplungreg-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing pinned requirements (torch CPU build, SimpleITK, slicer-core, trame-slicer, ...)"
  .venv/bin/python -m pip install -qq --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check --disable-pip-version-check
  echo "$want" > "$stamp"
fi
