"""`keras-openpi` starts light and quiet: `--help` imports no Keras/JAX/TensorFlow, TensorFlow prints nothing."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "keras", "keras_hub", "tensorflow", "torch")

# `keras-openpi --help` in its own process, then what that process imported;
# then TensorFlow's import, as a command that needs it (or saves a model) does.
SCRIPT = f"""
import sys
from keras_openpi.cli import main

sys.argv = ["keras-openpi", "--help"]
try:
    main()
except SystemExit as exit:
    print("EXIT", exit.code)
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
"""


def _run(*extra):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT + "\n".join(extra)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_imports_no_framework_and_prints_only_the_help():
    result = _run()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: keras-openpi") and "norm-stats" in out and "serve" in out
    assert "EXIT 0" in out
    assert "LOADED []" in out, out.splitlines()[-1]
    assert result.stderr == ""


def test_tensorflow_imports_quietly_in_the_cli_process():
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed: nothing to quiet")
    result = _run(
        "import tensorflow as tf",
        "print('TF', float(tf.constant(1.0) + 1), tf.config.get_visible_devices('GPU'))",
    )
    assert result.returncode == 0, result.stderr
    assert "TF 2.0 []" in result.stdout  # and JAX keeps the GPUs
    assert result.stderr == "", result.stderr  # no oneDNN / CUDA / absl start-up lines
