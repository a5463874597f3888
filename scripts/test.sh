#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs them.
#   .venv         keras_openpi with its test extra
#   .venv-client  openpi's own client (openpi-client from PyPI pins numpy<2, so it lives apart)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
if [ ! -x .venv-client/bin/python ]; then
  "$PYTHON" -m venv .venv-client
  # openpi-client 0.1.2 imports typing_extensions without declaring it.
  .venv-client/bin/pip install -q --disable-pip-version-check 'openpi-client==0.1.2' typing_extensions
fi
exec .venv/bin/python -m pytest -q "$@"
