"""Callbacks of a training run: per-step metrics (CSV, TensorBoard) and checkpoints."""

import csv
import pathlib

import keras

from keras_openpi.training.tensorboard import EventWriter

METRICS_FILE = "metrics.csv"
COLUMNS = ("step", "loss", "grad_norm", "learning_rate")


def _is_chief():
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    return True


def read_metrics(path):
    """The rows of a `metrics.csv` as dicts of floats (`step` an int).

    Example:
    >>> read_metrics("checkpoints/demo/default/metrics.csv")[0]["loss"]  # doctest: +SKIP
    1.2913
    """
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return [
        {k: int(v) if k == "step" else (float(v) if v else None) for k, v in row.items()}
        for row in rows
    ]


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
    trained again) are dropped first, so the file reads as one run. The
    values come from the model's step logs (`StepLogsMixin`). TensorBoard
    event files go to `<directory>/tensorboard`.

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
        if not _is_chief():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            with open(self.path, newline="") as file:
                kept = [row for row in csv.reader(file)][1:]
            kept = [row for row in kept if row and int(row[0]) <= self.step]
        self._file = open(self.path, "w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerows([COLUMNS, *kept])
        self._file.flush()
        if self.tensorboard:
            self._writer = EventWriter(self.directory / "tensorboard")

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
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
    ):
        super().__init__()
        self.manager = manager
        self.save_interval = int(save_interval)
        self.final_step = int(final_step)
        self.loader = loader
        self.norm_stats = norm_stats
        self.asset_id = asset_id
        self.config = config

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
        )
