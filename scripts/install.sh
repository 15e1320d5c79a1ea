#!/usr/bin/env bash
# The one install recipe, used by the Makefile (so by .ci/run) and by the Dockerfile.
#   scripts/install.sh            runtime dependencies into the current Python
#   scripts/install.sh --dev      plus test/tooling dependencies and the package in editable mode
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
TORCH_INDEX="${TORCH_INDEX:-}"   # e.g. https://download.pytorch.org/whl/cpu for a small CPU image

# torch first, on its own: pip then keeps it when resolving the rest.
if [ -n "$TORCH_INDEX" ]; then
  $PIP install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1
else
  $PIP install --no-cache-dir torch==2.14.1 torchvision==0.29.1
fi
if [ "${1:-}" = "--dev" ]; then
  $PIP install --no-cache-dir -r requirements-dev.txt
  $PIP install --no-cache-dir --no-deps -e .
else
  $PIP install --no-cache-dir -r requirements.txt
  $PIP install --no-cache-dir --no-deps .
fi
