#!/usr/bin/env bash
# The ALOHA simulator's side of examples/aloha_sim: headless OpenGL and .venv-sim.
#
#   .venv-sim   gym-aloha (MuJoCo, dm_control) and openpi's client (openpi-client pins numpy < 2,
#               so the simulator lives apart from keras_openpi, and talks to the policy server
#               through openpi's websocket client as openpi's examples/aloha_sim does)
#   Mesa EGL    software rendering (MUJOCO_GL=egl): Debian packages, installed when missing
#               (examples/common/sim_setup.sh, shared with examples/metaworld)
#
# Idempotent and quick when done: a render check decides whether anything is installed.
# Environment: PYTHON (default python3), KERAS_OPENPI_SIM_VENV (default <repo>/.venv-sim).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${KERAS_OPENPI_SIM_VENV:-$REPO/.venv-sim}"
PYTHON="${PYTHON:-python3}"
REQUIREMENTS=(gym-aloha==0.1.5 mujoco==3.8.1 dm-control==1.0.41 openpi-client==0.1.2
  typing_extensions imageio==2.38.1)

render_check() {
  MUJOCO_GL=egl "$VENV/bin/python" - <<'EOF'
import os, sys
sys.path.insert(0, os.path.join(os.environ["SIM_DIR"]))
from sim_env import TransferCubeEnv
env = TransferCubeEnv(("top",), (32, 32))
obs, _ = env.reset(seed=0)
assert obs["pixels"]["top"].shape == (32, 32, 3) and obs["pixels"]["top"].max() > 0
print("render check: ok")
os._exit(0)  # skip dm_control's renderer teardown at exit
EOF
}
export SIM_DIR="$REPO/examples/aloha_sim"

source "$REPO/examples/common/sim_setup.sh"
sim_venv "$VENV" "$PYTHON" "${REQUIREMENTS[@]}"
headless_rendering render_check
