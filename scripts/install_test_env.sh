#!/usr/bin/env bash
# What the real-Label-Studio tests (tests/real_ls) need on top of the project venv; idempotent.
#   - .venv-ls: Label Studio $LS_VERSION in a venv of its own (its pins clash with ours);
#     skipped when that version is already installed there;
#   - Debian chromium + chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver) when missing;
#   - selenium (pinned in requirements-dev.txt) in the project venv when missing;
#   - .venv-moto: moto's S3-compatible server $MOTO_VERSION in a venv of its own (the cloud storage
#     tests, tests/real_ls/test_cloud_storage.py); skipped when that version is there already.
# Used by `make test-env` (so by `make test` and .ci/run); not by the Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
LS_VENV="${LS_VENV:-.venv-ls}"
LS_VERSION=1.23.2
MOTO_VENV="${MOTO_VENV:-.venv-moto}"
MOTO_VERSION=5.2.5
PROJECT_PY="${PROJECT_PY:-.venv/bin/python}"

installed_version() {  # $1: python, $2: distribution
  "$1" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$2" 2>/dev/null || true
}

# --- Label Studio, in its own venv
if [ "$(installed_version "$LS_VENV/bin/python" label-studio)" = "$LS_VERSION" ] && [ -x "$LS_VENV/bin/label-studio" ]; then
  echo "label-studio $LS_VERSION already in $LS_VENV"
else
  test -x "$LS_VENV/bin/python" || "$PY" -m venv "$LS_VENV"
  "$LS_VENV/bin/python" -m pip install --no-cache-dir "label-studio==$LS_VERSION"
  test "$(installed_version "$LS_VENV/bin/python" label-studio)" = "$LS_VERSION"
fi

# --- moto's S3 server, in its own venv (its boto pins are not ours)
if [ "$(installed_version "$MOTO_VENV/bin/python" moto)" = "$MOTO_VERSION" ] && [ -x "$MOTO_VENV/bin/moto_server" ]; then
  echo "moto $MOTO_VERSION already in $MOTO_VENV"
else
  test -x "$MOTO_VENV/bin/python" || "$PY" -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/python" -m pip install --no-cache-dir "moto[server]==$MOTO_VERSION"
  test "$(installed_version "$MOTO_VENV/bin/python" moto)" = "$MOTO_VERSION"
fi

# --- headless Chromium and its driver, from Debian
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium chromium-driver
fi
/usr/bin/chromium --version 2>/dev/null  # (its Debian wrapper script prints a harmless shell warning)
/usr/bin/chromedriver --version

# --- selenium in the project venv (the version requirements-dev.txt pins)
SELENIUM_PIN="$(grep -E '^selenium==' requirements-dev.txt)"
if [ "selenium==$(installed_version "$PROJECT_PY" selenium)" != "$SELENIUM_PIN" ]; then
  "$PROJECT_PY" -m pip install --no-cache-dir "$SELENIUM_PIN"
fi
echo "test env ready: $LS_VENV (label-studio $LS_VERSION), $MOTO_VENV (moto $MOTO_VERSION), chromium, $SELENIUM_PIN"
