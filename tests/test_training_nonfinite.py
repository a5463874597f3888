"""A diverging run: non-finite learning rates refused, NaN steps stop the run or are skipped."""

import contextlib
import dataclasses
import io

import keras
import numpy as np
import pytest

from keras_openpi.backend.train_step import StepLogsMixin
from keras_openpi.checkpoint_arrays import read_items
from keras_openpi.checkpoint_format import stored_specs
from keras_openpi.cli import main
from keras_openpi.training import CheckpointManager
from keras_openpi.training import NonFiniteError
from keras_openpi.training import NonFiniteGuard
from keras_openpi.training import Trainer
from keras_openpi.training import apply_overrides
from keras_openpi.training import get_config
from keras_openpi.training import read_metrics
from training_support import TINY_SETS
from training_support import tiny_demo_config


@pytest.mark.parametrize(
    "setting, message",
    [
        ("optimizer.peak_lr=1e999", "optimizer.peak_lr must be a finite number above 0, got inf."),
        ("optimizer.peak_lr=NaN", "optimizer.peak_lr must be a finite number above 0, got nan."),
        ("optimizer.peak_lr=0", "optimizer.peak_lr must be a finite number above 0, got 0.0."),
        (
            "optimizer.decay_lr=-1e-5",
            "optimizer.decay_lr must be a finite number at least 0, got -1e-05.",
        ),
        ("optimizer.b2=1", "optimizer.b2 must be a finite number at least 0 and below 1, got 1.0."),
        ("optimizer.eps=0", "optimizer.eps must be a finite number above 0, got 0.0."),
        (
            "optimizer.warmup_steps=-1",
            "optimizer.warmup_steps must be an int of at least 0, got -1.",
        ),
        ("on_nonfinite=ignore", "on_nonfinite must be 'stop' or 'skip', got 'ignore'."),
    ],
)
def test_a_learning_rate_that_cannot_train_is_refused_up_front(setting, message):
    with pytest.raises(ValueError) as caught:
        apply_overrides(get_config("demo"), [setting])
    assert str(caught.value) == message


class Linear(StepLogsMixin, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="zeros")

    def call(self, x):
        return self.dense(x)


def fit_linear(x, y, skip=False, model=None):
    if model is None:
        model = Linear()
        model.skip_nonfinite_updates = skip
        model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    return model


def test_the_jax_train_step_drops_a_non_finite_update_and_counts_the_step():
    x = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
    y = np.zeros((6, 2), "float32")
    x[2, 0] = np.nan  # in the second batch (rows 2-3)
    model = fit_linear(x, y, skip=True)
    reference = fit_linear(x[:2], y[:2])
    reference.optimizer.iterations.assign(2)  # the skipped step counts (the schedule advances)
    fit_linear(x[4:], y[4:], model=reference)
    assert int(model.optimizer.iterations) == 3
    for got, want in zip(
        [*model.variables, *model.optimizer.variables],
        [*reference.variables, *reference.optimizer.variables],
    ):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, err_msg=got.path)
    unskipped = fit_linear(x, y, skip=False)
    assert not np.all(np.isfinite(unskipped.dense.kernel.numpy()))  # what skipping prevents


def test_the_guard_stops_at_a_non_finite_step_or_counts_it():
    lines = []
    guard = NonFiniteGuard("skip", skipped=2, log=lines.append)
    guard.step = 6
    guard.on_train_batch_end(0, {"loss": float("nan"), "grad_norm": 1.0})
    assert guard.skipped == 3 and lines == [
        "step 7: the loss is nan: its update was skipped (3 skipped so far; on_nonfinite=skip)"
    ]
    guard = NonFiniteGuard("stop")
    guard.step = 0
    guard.on_train_batch_end(0, {"loss": 1.0, "grad_norm": 2.0})
    with pytest.raises(NonFiniteError) as caught:
        guard.on_train_batch_end(1, {"loss": 1.0, "grad_norm": float("inf")})
    assert str(caught.value) == (
        "step 2: the gradient norm is inf, so the run stopped (on_nonfinite=stop); nothing from "
        "step 2 on was saved and the last good checkpoint is none. Lower optimizer.peak_lr, "
        "check the data and norm stats, or set on_nonfinite=skip."
    )


def poison(trainer, batch_index):
    """Makes the loader's batch `batch_index` (step `batch_index + 1`) carry NaN actions."""
    batch = trainer.loader.batch

    def poisoned(index):
        observation, actions = batch(index)
        if index == batch_index:
            actions = np.full_like(actions, np.nan)
        return observation, actions

    trainer.loader.batch = poisoned


def all_finite(step_dir):
    items = [p.name for p in (step_dir / "arrays").iterdir() if p.is_dir()]
    requests = {item: dict.fromkeys(stored_specs(step_dir, f"arrays/{item}")) for item in items}
    arrays = read_items(step_dir / "arrays", requests, local=True)
    values = [a for item in items for a in arrays[item].values() if a.dtype.kind == "f"]
    return "model_weights" in items and values and all(np.isfinite(a).all() for a in values)


def test_a_nan_step_stops_the_run_keeps_the_good_checkpoints_and_resume_continues(tmp_path):
    config = tiny_demo_config(tmp_path)  # 8 steps, a checkpoint every 2, keep the last 2
    run = tmp_path / "run"
    trainer = Trainer(config, checkpoint_dir=run, verbose=0, log=None).prepare()
    poison(trainer, 4)
    with pytest.raises(NonFiniteError) as caught:
        trainer.run()
    assert str(caught.value) == (
        "step 5: the loss is nan and the gradient norm is nan, so the run stopped "
        "(on_nonfinite=stop); nothing from step 5 on was saved and the last good checkpoint is "
        f"{run / '4'}. Lower optimizer.peak_lr, check the data and norm stats, or set "
        "on_nonfinite=skip."
    )
    assert CheckpointManager(run).steps() == [2, 4] and all_finite(run / "4")
    assert not (run / "export").exists()
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and np.isnan(rows[-1]["loss"])

    lines = []
    Trainer(config, checkpoint_dir=run, resume=True, verbose=0, log=lines.append).run()
    assert any(line.startswith("resuming at step 4: 4 steps to step 8 of 8,") for line in lines)
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == list(range(1, 9))
    (superseded,) = read_metrics(run / "metrics_superseded.csv")
    assert superseded["step"] == 5 and np.isnan(superseded["loss"])
    assert CheckpointManager(run).steps() == [6, 8] and (run / "export" / "policy.keras").is_file()


def test_skip_drops_the_nan_steps_update_and_the_run_finishes(tmp_path):
    config = dataclasses.replace(tiny_demo_config(tmp_path), on_nonfinite="skip")
    run = tmp_path / "run"
    lines = []
    trainer = Trainer(config, checkpoint_dir=run, verbose=0, log=lines.append).prepare()
    poison(trainer, 4)
    result = trainer.run()
    assert result["step"] == 8 and result["skipped_steps"] == 1
    assert (
        "step 5: the loss is nan and the gradient norm is nan: its update was skipped "
        "(1 skipped so far; on_nonfinite=skip)"
    ) in lines
    state = CheckpointManager(run).read_state()
    assert state["skipped_steps"] == 1 and state["step"] == 8
    assert int(trainer.model.optimizer.iterations) == 8
    assert all_finite(run / "8") and all_finite(run / "6")
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert np.isnan(rows[4]["loss"]) and all(np.isfinite(r["loss"]) for r in rows[5:])


def test_a_diverging_cli_run_exits_non_zero_and_exports_nothing(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "demo", "--checkpoint-dir", str(run), "--max-steps", "6"]
    sets = [*TINY_SETS, "batch_size=4", "save_interval=1", "optimizer.peak_lr=1e30"]
    sets += ["optimizer.warmup_steps=0", f"assets_dir={tmp_path / 'assets'}"]
    args += [arg for item in sets for arg in ("--set", item)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    assert code == 1, err.getvalue()
    assert err.getvalue() == (
        "keras-openpi train: error: step 2: the loss is nan and the gradient norm is nan, so the "
        "run stopped (on_nonfinite=stop); nothing from step 2 on was saved and the last good "
        f"checkpoint is {run / '1'}. Lower optimizer.peak_lr, check the data and norm stats, or "
        "set on_nonfinite=skip.\n"
    )
    assert not (run / "export").exists() and CheckpointManager(run).steps() == [1]
    assert all_finite(run / "1")
    assert [row["step"] for row in read_metrics(run / "metrics.csv")] == [1, 2]
