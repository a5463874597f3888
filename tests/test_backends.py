"""The backend matrix: parity and fine-tuning on PyTorch and TensorFlow, `.keras` files across backends.

Each backend runs in its own subprocess (Keras fixes the backend at import).
"""

import numpy as np
import pytest
from backend_support import OTHER_BACKENDS
from backend_support import TESTS
from backend_support import build_models
from backend_support import failure_report
from backend_support import load_and_check
from backend_support import run_on_backend
from backend_support import save

# openpi parity of every fixture (π0, π0.5, π0 LoRA-merged, π0-FAST), and the
# backend checks: XLA programs, compiled sampling following the weights, seeded
# π0-FAST sampling, LoRA `fit` on the demo task, bfloat16 + remat, int8,
# `keras-openpi train` with resume.
MATRIX_FILES = (
    "tests/test_pi0_parity.py",
    "tests/test_pi0_fast_parity.py",
    "tests/backend_checks.py",
)
# The outcomes other than a pass each backend is expected to report (see backend_checks.py).
EXPECTED_OTHER = {"torch": {"skipped": 1}, "tensorflow": {}}
MIN_PASSED = 28  # PyTorch: 22 parity tests and 6 backend checks


def outcome_counts(summary):
    """`{"passed": 27, "skipped": 1, ...}` from pytest's last line, warnings left out."""
    counts = {}
    for part in summary.split(" in ")[0].split(", "):
        number, outcome = part.split(" ", 1)
        counts[outcome.rstrip("s") if outcome.startswith("warning") else outcome] = int(number)
    counts.pop("warning", None)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_parity_and_fine_tuning_on_backend(backend):
    result = run_on_backend(
        backend, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *MATRIX_FILES], timeout=1200
    )
    assert result.returncode == 0, failure_report(result)
    counts = outcome_counts(result.stdout.strip().splitlines()[-1])
    # Any failure, error, unexpected skip or expected failure is a difference.
    assert counts.pop("passed") >= MIN_PASSED, failure_report(result)
    assert counts == EXPECTED_OTHER[backend], failure_report(result)


def test_keras_files_move_between_backends(tmp_path):
    """JAX writes, PyTorch loads and rewrites, TensorFlow loads and rewrites, JAX loads.

    At each hop the loaded models must give the writer's outputs (π0's
    actions for fixed noise, π0-FAST's greedy tokens and logits, 1e-4) and
    LoRA structure (adapted layers, rank, alpha, trainable weights), then
    their adapters are moved, so each file carries values its writer set.
    """
    save(build_models(), tmp_path / "jax")
    hops = [("torch", "jax", 2), ("tensorflow", "torch", 3)]
    for backend, source, seed in hops:
        result = run_on_backend(
            backend,
            [str(TESTS / "backend_support.py"), str(tmp_path / source), str(tmp_path / backend), str(seed)],
            timeout=600,
        )
        assert result.returncode == 0, failure_report(result)
        assert f"{backend}: loaded {tmp_path / source}" in result.stdout
    _, final = load_and_check(tmp_path / "tensorflow")
    with np.load(tmp_path / "jax" / "outputs.npz") as first:
        assert np.abs(final["pi0_lora/actions"] - first["pi0_lora/actions"]).max() > 1e-2
        assert np.abs(final["pi0_fast_lora/logits"] - first["pi0_fast_lora/logits"]).max() > 1e-2
