"""Callbacks of a training run: per-step metrics (CSV, TensorBoard), a NaN guard, checkpoints."""

import csv
import math
import os
import pathlib
import sys

import keras

from keras_openpi.backend.multiprocess import process_index
from keras_openpi.training.errors import NonFiniteError
from keras_openpi.training.run_dir import METRICS_FILE
from keras_openpi.training.run_dir import SUPERSEDED_METRICS_FILE
from keras_openpi.training.tensorboard import EventWriter

COLUMNS = ("step", "loss", "grad_norm", "learning_rate")
NONFINITE_POLICIES = ("stop", "skip")


def read_metrics(path):
    """The rows of a `metrics.csv` as dicts of floats (`step` an int).

    Example:
    >>> read_metrics("checkpoints/demo/default/metrics.csv")[0]["loss"]  # doctest: +SKIP
    1.2913
    """
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            out.append(
                {k: int(v) if k == "step" else (float(v) if v else None) for k, v in row.items()}
            )
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {line} is not a row of numbers: {row}") from None
    return out


class _StepCounter(keras.callbacks.Callback):
    """Counts global steps: the optimizer's step count at the start of `fit`, plus one per batch."""

    def on_train_begin(self, logs=None):
        self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.start_step = self.step

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1


class MetricsLogger(_StepCounter):
    """Writes every step's `loss`, `grad_norm` and `learning_rate` to `metrics.csv` and TensorBoard.

    `metrics.csv` (columns `step,loss,grad_norm,learning_rate`; `step` counts
    optimizer updates from 1) is flushed after each row. When a run resumes,
    rows after its starting step (steps after the checkpoint, which will be
    trained again) move to `metrics_superseded.csv` (appended, never
    deleted), so `metrics.csv` reads as one run. The values come from the
    model's step logs (`StepLogsMixin`). TensorBoard event files go to
    `<directory>/tensorboard`.

    Args:
        directory: the run's checkpoint directory.
        tensorboard: also write TensorBoard scalars.

    Example:
    >>> model.fit(loader, steps_per_epoch=100, callbacks=[MetricsLogger(run_dir)])  # doctest: +SKIP
    """

    def __init__(self, directory, tensorboard=True):
        super().__init__()
        self.directory = pathlib.Path(directory)
        self.tensorboard = tensorboard
        self._file = None
        self._writer = None

    @property
    def path(self):
        return self.directory / METRICS_FILE

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if process_index() != 0:  # process 0 writes the metrics
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._supersede_rows_after(self.step)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        if self._file.tell() == 0:
            self._csv.writerow(COLUMNS)
            self._file.flush()
        if self.tensorboard:
            self._writer = EventWriter(self.directory / "tensorboard")

    def _supersede_rows_after(self, step):
        """Moves the rows after `step` (and unreadable ones) to `metrics_superseded.csv`."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as file:
            text = file.read()
        kept, moved = [], []
        for row in list(csv.reader(text.splitlines()))[1:]:
            if row:
                (kept if row[0].isdigit() and int(row[0]) <= step else moved).append(row)
        if not moved and text.endswith("\n"):
            return
        if moved:
            with open(self.directory / SUPERSEDED_METRICS_FILE, "a", newline="") as file:
                writer = csv.writer(file)
                if file.tell() == 0:
                    writer.writerow(COLUMNS)
                writer.writerows(moved)
                file.flush()
                os.fsync(file.fileno())
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", newline="") as file:
            csv.writer(file).writerows([COLUMNS, *kept])
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, self.path)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self._file is None:
            return
        logs = logs or {}
        values = {key: logs.get(key) for key in COLUMNS[1:]}
        self._csv.writerow(
            [self.step, *("" if v is None else repr(float(v)) for v in values.values())]
        )
        self._file.flush()
        if self._writer is not None:
            self._writer.scalars(self.step, {k: v for k, v in values.items() if v is not None})

    def on_train_end(self, logs=None):
        self.close()

    def close(self):
        """Closes the files (also when `fit` stops on an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class NonFiniteGuard(_StepCounter):
    """Stops the run at a non-finite loss or gradient norm, or counts the skipped step.

    It reads the step's `loss` and `grad_norm` from the logs, which the
    metrics already bring to the host each step, so it adds no device sync.
    Put it before the `CheckpointSaver`: on `stop` it raises before the
    step is saved, so no checkpoint and no export hold the diverged weights.
    On `skip` the train step has not applied the update (the model's
    `skip_nonfinite_updates`, JAX only); the guard counts and reports it.

    Args:
        policy: `stop` (raise `NonFiniteError` naming the step) or `skip`.
        manager: the run's `CheckpointManager`, to name the last good checkpoint.
        skipped: the steps skipped before this `fit` (a resumed run's count).
        log: where a skipped step is reported.

    Example:
    >>> guard = NonFiniteGuard("stop", manager)  # doctest: +SKIP
    >>> model.fit(loader, steps_per_epoch=100, callbacks=[guard, saver])  # doctest: +SKIP
    """

    def __init__(self, policy="stop", manager=None, skipped=0, log=None):
        super().__init__()
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}.")
        self.policy = policy
        self.manager = manager
        self.skipped = int(skipped)
        self.log = log or (lambda text: print(text, file=sys.stderr))

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        logs = logs or {}
        bad = {}
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(float(value)):
                bad[key] = float(value)
        if not bad:
            return
        values = " and ".join(
            f"the {'gradient norm' if k == 'grad_norm' else k} is {v}" for k, v in bad.items()
        )
        if self.policy == "skip":
            self.skipped += 1
            self.log(
                f"step {self.step}: {values}: its update was skipped "
                f"({self.skipped} skipped so far; on_nonfinite=skip)"
            )
            return
        newest = self.manager.latest_step() if self.manager is not None else None
        where = "none" if newest is None else str(self.manager.step_dir(newest))
        raise NonFiniteError(
            f"step {self.step}: {values}, so the run stopped (on_nonfinite=stop); nothing from "
            f"step {self.step} on was saved and the last good checkpoint is {where}. Lower "
            "optimizer.peak_lr, check the data and norm stats, or set on_nonfinite=skip."
        )


class CheckpointSaver(_StepCounter):
    """Saves a checkpoint every `save_interval` steps and at `final_step`.

    Each checkpoint holds the model (weights with LoRA adapters, the noise
    generator's state), the optimizer state with the EMA, the step, the data
    loader's position (the index of the next global batch: the loader's
    start plus the steps trained in this `fit`) and the norm stats.

    Args:
        manager: a `CheckpointManager`.
        save_interval: steps between checkpoints.
        final_step: the run's last step (always saved).
        loader: the `DataLoader` given to `fit` (with `shuffle=False`), or None.
        norm_stats: `{key: NormStats}` to store with each checkpoint.
        asset_id: their asset id.
        config: the `TrainConfig`, stored with each checkpoint.
        guard: the run's `NonFiniteGuard`; its count of skipped steps is stored.

    Example:
    >>> saver = CheckpointSaver(CheckpointManager(run_dir), 1000, 30_000, loader=loader)  # doctest: +SKIP
    >>> model.fit(loader, steps_per_epoch=30_000, shuffle=False, callbacks=[saver])  # doctest: +SKIP
    """

    def __init__(
        self,
        manager,
        save_interval,
        final_step,
        loader=None,
        norm_stats=None,
        asset_id=None,
        config=None,
        guard=None,
    ):
        super().__init__()
        self.manager = manager
        self.save_interval = int(save_interval)
        self.final_step = int(final_step)
        self.loader = loader
        self.norm_stats = norm_stats
        self.asset_id = asset_id
        self.config = config
        self.guard = guard

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._loader_start = None if self.loader is None else self.loader.start

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.step % self.save_interval and self.step != self.final_step:
            return
        data_state = None
        if self.loader is not None:
            data_state = self.loader.state(
                next_batch=self._loader_start + self.step - self.start_step
            )
        self.manager.save(
            self.step,
            self.model,
            data_state=data_state,
            norm_stats=self.norm_stats,
            asset_id=self.asset_id,
            config=self.config,
            extra_state=None if self.guard is None else {"skipped_steps": self.guard.skipped},
        )
