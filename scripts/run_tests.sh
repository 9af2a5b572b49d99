#!/usr/bin/env bash
# Set up the environment if needed, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The viewer's browser test (Testing/test_viewer.py) needs Chromium and EGL with Mesa (headless rendering);
# installed here where apt-get may be used, else that test skips saying what is missing.
browser_packages="chromium libegl1 libegl-mesa0 libgl1-mesa-dri"
if ! command -v chromium >/dev/null 2>&1 \
   || ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -c 'libEGL\.so\.1' >/dev/null; then
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    sudo_cmd=$([ "$(id -u)" = 0 ] || echo "sudo -n")
    echo "[tests] installing $browser_packages for the viewer's browser test"
    $sudo_cmd apt-get install -y -qq $browser_packages >/dev/null 2>&1 \
      || { $sudo_cmd apt-get update -qq >/dev/null 2>&1 && $sudo_cmd apt-get install -y -qq $browser_packages >/dev/null 2>&1; } \
      || echo "[tests] could not install $browser_packages: the viewer's browser test will skip"
  else
    echo "[tests] Chromium or libEGL missing and apt-get not usable: the viewer's browser test will skip"
  fi
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q Testing "$@"
