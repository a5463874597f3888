"""The LeRobot reference fixture (tests/fixtures/lerobot) and how to run LeRobot itself on a checkpoint."""

import os
import pathlib
import shutil
import subprocess

import keras
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "lerobot"
SCRIPT = FIXTURE / "lerobot_reference.py"
LEROBOT_PYTHON = REPO / ".venv-lerobot" / "bin" / "python"
NUM_STEPS = 10


def reference(name):
    with np.load(FIXTURE / name / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def observation(model, ref):
    """The fixture's inputs (LeRobot: per-camera NCHW lists) as a keras_openpi observation."""
    return {
        "image": {k: ref["input/images"][i].transpose(0, 2, 3, 1) for i, k in enumerate(model.image_keys)},
        "image_mask": {k: ref["input/image_masks"][i] for i, k in enumerate(model.image_keys)},
        "state": ref["input/state"],
        "tokenized_prompt": ref["input/tokens"],
        "tokenized_prompt_mask": ref["input/token_masks"],
    }


def sample_and_loss(model, ref):
    obs = observation(model, ref)
    sampled = model.sample_actions(obs, noise=ref["input/noise"], num_steps=NUM_STEPS)
    loss = model.flow_matching_loss(obs, ref["input/actions"], noise=ref["input/noise"], time=ref["input/time"])
    return keras.ops.convert_to_numpy(sampled), keras.ops.convert_to_numpy(loss)


def copy_fixture(name, target):
    """A writable copy of one fixture checkpoint directory (model.safetensors + config.json)."""
    target = pathlib.Path(target)
    target.mkdir(parents=True)
    for file in ("model.safetensors", "config.json"):
        shutil.copy(FIXTURE / name / file, target / file)
    return target


def run_lerobot(*args, timeout=600):
    """Runs the reference script in `.venv-lerobot` (skips when scripts/test.sh has not made it)."""
    if not LEROBOT_PYTHON.exists():
        pytest.skip(".venv-lerobot not found (scripts/test.sh makes it)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [str(LEROBOT_PYTHON), str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
