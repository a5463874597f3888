#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine, then runs them.
#   .venv            keras_openpi with its test extra
#   .venv-client     openpi's own client (openpi-client from PyPI pins numpy<2, so it lives apart)
#   .venv-sim        the ALOHA simulator and openpi's client (examples/aloha_sim/setup.sh)
#   .venv-lerobot    LeRobot 0.6.1 on PyTorch CPU, for the LeRobot import/export tests (scripts/lerobot_venv.sh)
#   .venv-metaworld  MetaWorld and openpi's client (examples/metaworld/setup.sh)
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
# The ALOHA simulator (gym-aloha, MuJoCo) in .venv-sim and headless rendering (Mesa EGL, from
# Debian when missing) for tests/test_aloha_sim.py.
PYTHON="$PYTHON" bash examples/aloha_sim/setup.sh
PYTHON="$PYTHON" bash scripts/lerobot_venv.sh
# MetaWorld (MuJoCo 3.3.0) in .venv-metaworld for tests/test_metaworld.py.
PYTHON="$PYTHON" bash examples/metaworld/setup.sh
exec .venv/bin/python -m pytest -q --durations=25 "$@"
