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
# The reference and simulator virtualenvs do not need .venv: they are made beside it, each set-up's output in a log
# shown once it is done. The two simulators' set-ups run one after the other (either may apt-get).
LOGS="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$LOGS"' EXIT
PIDS=()
beside() {
  local name="$1"
  shift
  ("$@") > "$LOGS/$name.log" 2>&1 &
  PIDS+=("$!:$name")
}
client_venv() {
  [ -x .venv-client/bin/python ] && return 0
  "$PYTHON" -m venv .venv-client
  # openpi-client 0.1.2 imports typing_extensions without declaring it.
  .venv-client/bin/pip install -q --disable-pip-version-check 'openpi-client==0.1.2' typing_extensions
}
simulators() {
  # The ALOHA simulator (gym-aloha, MuJoCo) in .venv-sim, headless rendering (Mesa EGL, from Debian when missing)
  # for tests/test_aloha_sim.py; MetaWorld (MuJoCo 3.3.0) in .venv-metaworld for tests/test_metaworld.py.
  PYTHON="$PYTHON" bash examples/aloha_sim/setup.sh
  PYTHON="$PYTHON" bash examples/metaworld/setup.sh
}
beside client client_venv
beside simulators simulators
beside lerobot env PYTHON="$PYTHON" bash scripts/lerobot_venv.sh
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
failed=0
for job in "${PIDS[@]}"; do
  if wait "${job%%:*}"; then
    cat "$LOGS/${job#*:}.log"
  else
    echo "set-up of ${job#*:} failed; its output:" >&2
    cat "$LOGS/${job#*:}.log" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] || exit 1
trap - EXIT
rm -rf "$LOGS"
echo "set-up: ${SECONDS} s"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
