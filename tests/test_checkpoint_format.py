"""The checkpoint format: manifests, complete-or-ignored, corrupt files named, fallback, imports."""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_openpi import checkpoint_format
from keras_openpi.checkpoint_format import CheckpointError
from keras_openpi.checkpoint_format import checkpoint_problem
from keras_openpi.checkpoint_format import find_step_dir
from keras_openpi.data.normalize import NormStats
from keras_openpi.training import AdamW
from keras_openpi.training import CheckpointManager
from keras_openpi.training import NonFiniteError
from keras_openpi.training.resume import choose_checkpoint

STATS = {"state": NormStats([0.0], [1.0]), "actions": NormStats([0.0], [1.0])}


def small_model(value=0.0):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")], name="small")
    model.compile(optimizer=AdamW(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    for variable in model.variables:
        variable.assign(np.full(variable.shape, value, "float32"))
    return model


def largest_file(folder):
    """The biggest file under `folder`, relative to its step directory (an array's data)."""
    path = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    return path.relative_to(folder.parents[1]).as_posix()


def saved_run(tmp_path, steps=(2, 4, 6)):
    manager = CheckpointManager(tmp_path, keep_last=len(steps))
    for step in steps:
        manager.save(
            step, small_model(step), data_state={"next_batch": step}, norm_stats=STATS, asset_id="a"
        )
    return manager


def test_a_checkpoint_lists_every_file_with_its_size_and_sha256(tmp_path):
    saved_run(tmp_path, steps=(2,))
    step_dir = tmp_path / "2"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["format"] == "keras_openpi.train_checkpoint/3" and manifest["step"] == 2
    files = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert {"assets/a/norm_stats.json", "model.json", "state.json"} < set(manifest["files"])
    # The weights and the optimizer state in orbax's OCDBT layout; no EMA (it is off).
    folders = {name.split("/")[1] for name in manifest["files"] if name.startswith("arrays/")}
    assert folders == {"model_weights", "optimizer", "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert "arrays/model_weights/ocdbt.process_0/manifest.ocdbt" in manifest["files"]
    for name, entry in manifest["files"].items():
        data = (step_dir / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoint_problem(step_dir, checksums=True) is None
    state = json.loads((step_dir / "state.json").read_text())
    assert state["processes"] == 1 and state["data"] == {"next_batch": 2}


def truncate_weights(step_dir):
    name = largest_file(step_dir / "arrays" / "model_weights")
    (step_dir / name).write_bytes(b"x")
    return name


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda d: shutil.rmtree(d / "arrays" / "optimizer"), "arrays/optimizer is missing"),
        (lambda d: (d / "manifest.json").unlink(), "it has no manifest.json"),
        (
            lambda d: (d / "manifest.json").write_text("{"),
            "manifest.json is not valid JSON",
        ),
        (
            lambda d: truncate_weights(d) + " has 1 bytes, manifest.json lists",
            None,
        ),
    ],
)
def test_an_incomplete_checkpoint_is_not_listed_and_says_why(tmp_path, damage, problem):
    manager = saved_run(tmp_path)
    named = damage(tmp_path / "6")
    problem = problem or named  # the truncated file's name is known once it is chosen
    assert manager.steps() == [2, 4]
    assert problem in checkpoint_problem(tmp_path / "6")


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["state.json", "weights"])
def test_a_corrupt_file_is_named_and_loading_falls_back(tmp_path, name):
    saved_run(tmp_path)
    if name == "weights":
        name = largest_file(tmp_path / "6" / "arrays" / "model_weights")
    flip_last_byte(tmp_path / "6" / name)
    problem = f"{name} does not match its sha256 in manifest.json (corrupt)"
    assert checkpoint_problem(tmp_path / "6") is None  # same size: only the checksum tells
    assert checkpoint_problem(tmp_path / "6", checksums=True) == problem
    with pytest.warns(
        UserWarning, match=rf"using checkpoint 4; skipped 6 \({re.escape(problem)}\)"
    ):
        assert find_step_dir(tmp_path) == tmp_path / "4"
    with pytest.raises(CheckpointError, match=rf"/6 is not complete: {re.escape(problem)}\.$"):
        find_step_dir(tmp_path / "6")
    point = choose_checkpoint(tmp_path, end_step=10)
    assert (point.step, point.skipped, point.finished) == (4, [(6, problem)], False)
    assert point.state["data"] == {"next_batch": 4}


def test_unreadable_arrays_are_named(tmp_path):
    (tmp_path / "arrays" / "model_weights").mkdir(parents=True)
    (tmp_path / "arrays" / "model_weights" / "_METADATA").write_text("not json")
    with pytest.raises(
        CheckpointError, match=rf"^{tmp_path}/arrays/model_weights cannot be read as arrays: "
    ):
        checkpoint_format.stored_specs(tmp_path, "arrays/model_weights")


def test_resume_skips_a_checkpoint_without_optimizer_state_and_refuses_when_none_is_left(tmp_path):
    saved_run(tmp_path, steps=(2,))
    manager = CheckpointManager(tmp_path, keep_last=2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")], name="small")
    manager.save(4, model, data_state={"next_batch": 4}, norm_stats=STATS, asset_id="a")
    assert manager.steps() == [2, 4]  # complete, but it cannot be continued exactly
    point = choose_checkpoint(tmp_path, end_step=10)
    assert point.step == 2 and point.skipped == [
        (
            4,
            "it holds no optimizer state (arrays/optimizer; resuming would restart the "
            "optimizer's warm-up)",
        )
    ]
    with pytest.raises(
        CheckpointError,
        match=r"holds no optimizer state \(arrays/optimizer\): restoring it would restart",
    ):
        manager.restore(small_model(), 4)
    (tmp_path / "2" / "state.json").write_text("{}")
    with pytest.raises(
        CheckpointError,
        match=rf"^{tmp_path} holds no checkpoint to resume \(4: it holds no optimizer state .*; 2: "
        r"state.json has 2 bytes, manifest.json lists \d+ \(truncated\?\)\): pass --overwrite to "
        r"start over \(it removes them\) or choose another --checkpoint-dir\.$",
    ):
        choose_checkpoint(tmp_path, end_step=10)


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    manager = saved_run(tmp_path, steps=(2,))
    diverged = small_model(1.0)
    diverged.layers[0].kernel.assign(np.full((3, 2), np.nan, "float32"))
    with pytest.raises(NonFiniteError) as caught:
        manager.save(4, diverged)
    assert str(caught.value) == (
        "step 4: the weight 'small/dense/kernel' is NaN or infinite, so checkpoint 4 was not "
        f"written; the newest good checkpoint is {tmp_path / '2'}."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]


def test_serving_reads_the_format_without_importing_training():
    code = (
        "import sys, keras_openpi.serving.checkpoint as c, keras_openpi.checkpoint_format as f; "
        "print(sorted(m for m in sys.modules if m.startswith('keras_openpi.training')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_corrupt_optimizer_state_still_serves_but_is_not_resumed(tmp_path):
    saved_run(tmp_path)
    name = largest_file(tmp_path / "6" / "arrays" / "optimizer")
    flip_last_byte(tmp_path / "6" / name)
    assert find_step_dir(tmp_path) == tmp_path / "6"  # inference reads no optimizer state
    point = choose_checkpoint(tmp_path, end_step=10)
    assert point.step == 4 and point.skipped == [
        (6, f"{name} does not match its sha256 in manifest.json (corrupt)")
    ]
