#!/usr/bin/env bash
# Makes .venv-lerobot: LeRobot 0.6.1 (PyTorch, CPU) for tests/test_lerobot_*.py, which run LeRobot's own π0 / π0.5
# (tests/fixtures/lerobot/lerobot_reference.py). Nothing is downloaded at test time.
#
# LeRobot 0.6.1 declares Python >= 3.12 and torch < 2.12. PyPI's torch for Python 3.12 is a CUDA build of several GB,
# so it runs here on this project's Python 3.11 instead, with the torch 2.14.1 / torchvision 0.29.1 pair that pip
# finds on this machine's disk (LeRobot imports torchvision, which PyPI builds only against CUDA torch), LeRobot's
# package installed without its pins, and scripts/lerobot_py311.py rewriting its nine Python 3.12 type declarations.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-lerobot
[ -f "$VENV/.complete" ] && exit 0
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
# LeRobot 0.6.1's own dependencies (its pyproject, `pi` extra), at its bounds where the platform allows.
"${PIP[@]}" 'torch==2.14.1' 'torchvision==0.29.1' 'numpy>=2.0,<2.3' 'transformers>=5.4,<5.6' \
  'draccus>=0.11.6,<0.12' 'huggingface-hub>=1.6,<2' 'safetensors>=0.4.3,<1' 'packaging>=24.2,<26' \
  'termcolor>=2.4,<4' 'tqdm>=4.66,<5' 'einops>=0.8,<0.9' 'gymnasium>=1.1.1,<2' 'requests>=2.32,<3' \
  'scipy>=1.14,<2' 'pillow>=10,<13' 'opencv-python-headless>=4.9,<4.14'
"${PIP[@]}" --no-deps --ignore-requires-python 'lerobot==0.6.1'
"$VENV/bin/python" scripts/lerobot_py311.py "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/lerobot"
"$VENV/bin/python" -c 'from lerobot.policies.pi0.modeling_pi0 import PI0Policy; from lerobot.policies.pi05.modeling_pi05 import PI05Policy'
touch "$VENV/.complete"
