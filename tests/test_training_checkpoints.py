"""Checkpoints: atomic saves, retention, round trips, exact resume, metrics.csv, TensorBoard."""

import dataclasses
import errno
import json
import os
import re
import struct

import keras
import numpy as np
import pytest

from keras_openpi.checkpoint_format import OPTIMIZER_FILE
from keras_openpi.data.normalize import NormStats
from keras_openpi.models import Pi0
from keras_openpi.training import AdamW
from keras_openpi.training import CheckpointManager
from keras_openpi.training import CheckpointWriteError
from keras_openpi.training import Trainer
from keras_openpi.training import WarmupCosineDecay
from keras_openpi.training import checkpoints
from keras_openpi.training import export_policy
from keras_openpi.training import load_checkpoint_model
from keras_openpi.training import read_metrics
from keras_openpi.backend.keras_private import ema_pairs
from keras_openpi.training.tensorboard import crc32c
from keras_openpi.training.tensorboard import read_tfrecords
from training_support import TINY_MODEL
from training_support import tiny_demo_config

STATS = {
    "state": NormStats(mean=[0.0, 1.0], std=[1.0, 2.0]),
    "actions": NormStats(mean=[0.5], std=[3.0]),
}


def small_model(value=0.0):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")], name="small")
    model.compile(optimizer=AdamW(0.1, use_ema=True), loss="mse")
    model.optimizer.build(model.trainable_variables)
    for variable in [*model.variables, *model.optimizer.variables]:
        variable.assign(
            np.full(variable.shape, value, keras.backend.standardize_dtype(variable.dtype))
        )
    return model


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_period=4)
    model = small_model()
    for step in range(1, 11):
        manager.save(step, model)
    assert manager.steps() == [4, 8, 9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "4", "8", "9"]
    assert CheckpointManager(tmp_path, keep_last=1).latest_step() == 10
    # Never pruned: the checkpoint just written, even when it is not the newest.
    manager.save(3, model)
    assert manager.steps() == [3, 4, 8, 9, 10]
    manager.prune()
    assert manager.steps() == [4, 8, 9, 10]


def test_a_full_disk_leaves_no_partial_folder_and_names_the_file(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    model = small_model(1.0)
    manager.save(1, model, norm_stats=STATS, asset_id="robot")
    write = checkpoints.write_arrays

    def disk_full_on_optimizer(path, arrays):
        if path.name == OPTIMIZER_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, arrays)

    monkeypatch.setattr(checkpoints, "write_arrays", disk_full_on_optimizer)
    with pytest.raises(CheckpointWriteError) as caught:
        manager.save(2, small_model(2.0))
    monkeypatch.undo()
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert re.fullmatch(
        rf"checkpoint 2 was not written: No space left on device while writing "
        rf"{re.escape(str(tmp_path))}/\.partial-2-[0-9a-f]{{8}}/optimizer\.npz; nothing of it was "
        rf"left behind and the newest checkpoint is {re.escape(str(tmp_path / '1'))}\.",
        message,
    ), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # nothing half-written
    restored = small_model(9.0)
    state = manager.restore(restored)
    assert state["step"] == 1 and state["asset_id"] == "robot"
    assert all(np.all(v.numpy() == 1.0) for v in restored.variables)
    assert (tmp_path / "1" / "assets" / "robot" / "norm_stats.json").is_file()
    (tmp_path / ".partial-2-0123abcd").mkdir()  # what a killed process leaves
    manager.save(2, small_model(2.0))  # the next save clears it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]


def test_round_trip_keeps_lora_adapters_bf16_frozen_weights_ema_and_rng(tmp_path):
    strategy = {"name": "lora", "rank": 2, "frozen_dtype": "bfloat16"}

    def lora_model():
        model = Pi0(**TINY_MODEL, seed=0)
        model.apply_strategy(strategy)
        model.compile(optimizer=AdamW(use_ema=True))
        model.optimizer.build(model.trainable_variables)
        return model

    rng = np.random.default_rng(0)
    saved = lora_model()
    for variable in [*saved.variables, *saved.optimizer.variables]:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        value = (
            rng.integers(1, 1000, variable.shape)
            if "int" in dtype
            else rng.normal(size=variable.shape)
        )
        variable.assign(
            value.astype(np.float32).astype(dtype) if "float" in dtype else value.astype(dtype)
        )
    manager = CheckpointManager(tmp_path)
    manager.save(7, saved, data_state={"next_batch": 7}, norm_stats=STATS)
    assert json.loads((tmp_path / "7" / "state.json").read_text())["data"] == {"next_batch": 7}

    restored = lora_model()
    assert manager.restore(restored)["step"] == 7
    dtypes = set()
    for a, b in zip(
        [*saved.variables, *saved.optimizer.variables],
        [*restored.variables, *restored.optimizer.variables],
    ):
        dtypes.add(keras.backend.standardize_dtype(b.dtype))
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()), err_msg=b.path)
    assert {"bfloat16", "float32", "uint32"} <= dtypes  # frozen weights, trainable ones, seed state
    assert any("lora_kernel_a" in v.path for v in restored.trainable_variables)

    # For serving: the model rebuilt from the checkpoint, with the EMA weights where they exist.
    served = load_checkpoint_model(tmp_path)
    ema = {v.path: np.asarray(a.numpy()) for v, a in ema_pairs(saved.optimizer)}
    values = {v.path: np.asarray(v.numpy()) for v in saved.variables}
    assert ema and set(ema) < set(values)
    for variable in served.variables:
        want = ema.get(variable.path, values[variable.path])
        np.testing.assert_array_equal(np.asarray(variable.numpy()), want, err_msg=variable.path)
    assert served.finetuning_state.lora and not served.compiled

    plain = Pi0(**TINY_MODEL, seed=0)
    plain.compile(optimizer=AdamW(use_ema=True))
    mismatch = r"model_weights.npz does not match the model: 0 variables missing from the file "
    mismatch += r"\[\], 28 not in"
    with pytest.raises(ValueError, match=mismatch):
        manager.restore(plain)
    no_ema = lora_model()
    no_ema.compile(optimizer=AdamW(use_ema=False))
    with pytest.raises(ValueError, match="was saved with EMA; the model's optimizer has it off"):
        manager.restore(no_ema)


def run_demo(tmp_path, name, **kwargs):
    config = tiny_demo_config(tmp_path, ema_decay=0.9, augment=True)
    return Trainer(config, checkpoint_dir=tmp_path / name, verbose=0, log=None, **kwargs)


def test_resume_continues_exactly_and_metrics_are_logged(tmp_path):
    full = run_demo(tmp_path, "full")
    full.run()
    interrupted = run_demo(tmp_path, "resumed", max_steps=4)
    interrupted.run()
    metrics = tmp_path / "resumed" / "metrics.csv"
    metrics.write_text(metrics.read_text() + "5,9.0,9.0,9.0\n")  # a step after the checkpoint, lost
    resumed = run_demo(tmp_path, "resumed", resume=True)
    resumed.run()

    expected = read_metrics(tmp_path / "full" / "metrics.csv")
    got = read_metrics(metrics)
    superseded = tmp_path / "resumed" / "metrics_superseded.csv"  # moved aside, not lost
    assert superseded.read_text() == "step,loss,grad_norm,learning_rate\n5,9.0,9.0,9.0\n"
    assert metrics.read_text().splitlines()[0] == "step,loss,grad_norm,learning_rate"
    assert [row["step"] for row in got] == [row["step"] for row in expected] == list(range(1, 9))
    for row, want in zip(got, expected):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert row[key] == pytest.approx(want[key], abs=1e-6), (row["step"], key)
    schedule = WarmupCosineDecay(6, 3e-3, 60, 3e-4)
    for row in expected:
        assert row["learning_rate"] == pytest.approx(float(schedule(row["step"] - 1)), rel=1e-6)
        assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
    for a, b in zip(full.model.variables, resumed.model.variables):
        np.testing.assert_allclose(
            np.asarray(a.numpy()), np.asarray(b.numpy()), atol=1e-6, err_msg=a.path
        )
    state = CheckpointManager(tmp_path / "resumed").read_state()
    assert state["step"] == 8 and state["data"]["next_batch"] == 8 and state["ema"]
    assert CheckpointManager(tmp_path / "resumed").steps() == [6, 8]  # demo: keep the last 2

    # TensorBoard: one scalar record per step and tag, CRC-checked.
    (events,) = (tmp_path / "full" / "tensorboard").iterdir()
    records = read_tfrecords(events)
    assert b"brain.Event:2" in records[0] and len(records) == 9
    assert b"grad_norm" in records[3] and b"learning_rate" in records[3]
    assert struct.pack("<f", expected[2]["loss"]) in records[3]
    assert crc32c(b"123456789") == 0xE3069283


def test_resume_refuses_a_finished_exported_run_and_an_occupied_directory(tmp_path):
    config = dataclasses.replace(tiny_demo_config(tmp_path), num_train_steps=2)
    manager = CheckpointManager(tmp_path / "run")
    manager.save(2, small_model())
    with pytest.raises(
        ValueError, match=r"already holds checkpoints \(steps \[2\]\): pass --resume"
    ):
        Trainer(config, checkpoint_dir=tmp_path / "run", log=None).prepare()
    export_policy(small_model(), None, tmp_path / "run" / "export", step=2)
    with pytest.raises(ValueError, match="is at step 2 already and exported to"):
        Trainer(config, checkpoint_dir=tmp_path / "run", resume=True, log=None).prepare()
