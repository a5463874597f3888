#!/usr/bin/env bash
# The simulator's side of examples/metaworld: .venv-metaworld and headless OpenGL.
#
#   .venv-metaworld   MetaWorld 3.1.1 (MuJoCo 3.3.0, which it pins; gymnasium) and openpi's
#                     client (openpi-client pins numpy < 2, so the simulator lives apart from
#                     keras_openpi and talks to the policy server through openpi's websocket
#                     client, like a robot)
#   Mesa EGL          software rendering (MUJOCO_GL=egl): Debian packages, installed when
#                     missing (examples/common/sim_setup.sh, shared with examples/aloha_sim)
#
# Idempotent and quick when done: a render check decides whether anything is installed.
# Environment: PYTHON (default python3), KERAS_OPENPI_METAWORLD_VENV (default <repo>/.venv-metaworld).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${KERAS_OPENPI_METAWORLD_VENV:-$REPO/.venv-metaworld}"
PYTHON="${PYTHON:-python3}"
# gymnasium's MuJoCo module imports `packaging` without declaring it; openpi-client 0.1.2
# imports typing_extensions without declaring it.
REQUIREMENTS=(metaworld==3.1.1 mujoco==3.3.0 gymnasium==1.4.0 openpi-client==0.1.2
  numpy==1.26.4 packaging typing_extensions imageio==2.38.2)

render_check() {
  MUJOCO_GL=egl "$VENV/bin/python" - <<'EOF'
import os, sys
sys.path.insert(0, os.environ["METAWORLD_DIR"])
from sim_env import MetaWorldTask
task = MetaWorldTask("drawer-open-v3", (32, 32))
task.reset(0, 0)
image = task.render()
assert image.shape == (32, 32, 3) and image.max() > 0, image.shape
print("render check: ok")
os._exit(0)  # skip MuJoCo's EGL teardown at exit
EOF
}
export METAWORLD_DIR="$REPO/examples/metaworld"

source "$REPO/examples/common/sim_setup.sh"
sim_venv "$VENV" "$PYTHON" "${REQUIREMENTS[@]}"
headless_rendering render_check
