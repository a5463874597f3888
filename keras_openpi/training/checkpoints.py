"""Training checkpoints: atomic step directories with everything an exact resume needs.

    <checkpoint_dir>/
      <step>/                           one checkpoint, e.g. 1000/
        model.json                      the model (class and config, fine-tuning included)
        model_weights.npz               every model variable by path: LoRA adapters unmerged,
                                        frozen weights in their dtype, the noise generator's state
        ema_weights.npz                 the EMA of the trainable weights (with EMA on)
        optimizer.npz                   the other optimizer variables (step count, Adam moments)
        state.json                      step, data-iterator position, train config
        assets/<asset_id>/norm_stats.json
      metrics.csv, tensorboard/         (written by `keras_openpi.training.callbacks`)

A checkpoint is written into a hidden `.partial-*` directory and renamed to
`<step>` when complete, so a crash mid-save leaves every earlier checkpoint
intact and no half-written one that looks valid. The inference weights of a
step are its EMA weights (with EMA on) over the model weights, as openpi's
`params`; `load_checkpoint_model` loads them, and `keras-openpi serve DIR`
serves a checkpoint directory (its latest step) or one step directory.

On several hosts (`jax.distributed`) every process takes part in gathering
sharded weights and process 0 writes.
"""

import json
import os
import pathlib
import shutil
import time
import uuid

import keras
import numpy as np

FORMAT = "keras_openpi.train_checkpoint/1"
STATE_FILE = "state.json"
MODEL_FILE = "model.json"
WEIGHTS_FILE = "model_weights.npz"
EMA_FILE = "ema_weights.npz"
OPTIMIZER_FILE = "optimizer.npz"
ASSETS_DIR = "assets"
_DTYPES_KEY = "__dtypes__"
_HIDDEN = (".partial-", ".replaced-", ".deleting-")


# === Arrays on disk ===


def _host_value(variable):
    """The variable's value as a numpy array on the host (gathered across hosts if sharded)."""
    value = variable.value
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(keras.ops.convert_to_numpy(value))


def _write_arrays(path, arrays):
    """Writes `{name: array}` as an `.npz`; dtypes numpy lacks (bfloat16) are stored as raw bits."""
    stored, dtypes = {}, {}
    for name, array in arrays.items():
        if array.dtype.kind == "V" or array.dtype.name not in np.sctypeDict:
            dtypes[name] = array.dtype.name
            array = array.view(f"uint{8 * array.dtype.itemsize}")
        stored[name] = array
    stored[_DTYPES_KEY] = np.array(json.dumps(dtypes))
    with open(path, "wb") as file:
        np.savez(file, **stored)
        file.flush()
        os.fsync(file.fileno())


def _read_arrays(path):
    import ml_dtypes

    with np.load(path, allow_pickle=False) as data:
        dtypes = json.loads(str(data[_DTYPES_KEY])) if _DTYPES_KEY in data.files else {}
        arrays = {}
        for name in data.files:
            if name == _DTYPES_KEY:
                continue
            array = data[name]
            if name in dtypes:
                array = array.view(getattr(ml_dtypes, dtypes[name]))
            arrays[name] = array
    return arrays


def by_path(variables, what):
    """`{variable.path: variable}`; paths must be unique (they key the files)."""
    named = {v.path: v for v in variables}
    if len(named) != len(variables):
        raise ValueError(
            f"the {what} variables' paths are not unique, so they cannot be saved by path."
        )
    return named


def _assign(named, arrays, source, what):
    """Assigns `arrays[key]` to each `named[key]` variable; the key sets must match exactly."""
    missing = sorted(set(named) - set(arrays))
    unexpected = sorted(set(arrays) - set(named))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the {what}: {len(missing)} variables missing from the file "
            f"{missing[:3]}, {len(unexpected)} not in the {what} {unexpected[:3]} (a different "
            "model config or fine-tuning strategy?)."
        )
    for key, variable in named.items():
        array = arrays[key]
        if tuple(array.shape) != tuple(variable.shape):
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(array.shape)}, the {what}'s variable "
                f"{tuple(variable.shape)}."
            )
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if keras.backend.standardize_dtype(array.dtype) != dtype:
            raise ValueError(
                f"{source}: {key!r} is stored as {array.dtype}, the variable is {dtype}."
            )
    for key, variable in named.items():
        variable.assign(arrays[key])


# === The model, its EMA and its optimizer ===


def _ema_pairs(model):
    from keras_openpi.training.ema import ema_weights

    optimizer = getattr(model, "optimizer", None)
    return ema_weights(optimizer) if optimizer is not None else []


def _optimizer_variables(model):
    """`{path within the optimizer: variable}` of the optimizer's variables but the EMA averages.

    Keys drop the optimizer's own name (`adam_w/`, `adam_w_2/`, ...: Keras
    numbers the optimizers of one process), so a fresh optimizer matches.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return {}
    averages = {id(average) for _, average in _ema_pairs(model)}
    variables = [v for v in optimizer.variables if id(v) not in averages]
    named = by_path(variables, "optimizer")
    return {path.split("/", 1)[-1]: variable for path, variable in named.items()}


def model_spec(model):
    """The JSON-able class and config that rebuild `model` (without its training setup)."""
    spec = keras.saving.serialize_keras_object(model)
    spec.pop("compile_config", None)
    return spec


def _process_index():
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index()
    return 0


def _sync(name):
    if keras.backend.backend() == "jax":
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)


def _fsync_dir(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class CheckpointManager:
    """Saves, lists, prunes and restores the step checkpoints of a training run.

    Args:
        directory: the run's checkpoint directory.
        keep_last: how many of the most recent checkpoints to keep.
        keep_period: also keep every checkpoint whose step is a multiple of
            this (None: none), as openpi's `keep_period`.

    Example:
    >>> manager = CheckpointManager("checkpoints/demo/default", keep_last=2)  # doctest: +SKIP
    >>> manager.save(20, model, data_state=loader.state(next_batch=20))  # doctest: +SKIP
    >>> manager.restore(model)["step"]  # doctest: +SKIP
    20
    """

    def __init__(self, directory, keep_last=1, keep_period=None):
        if int(keep_last) < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}.")
        self.directory = pathlib.Path(directory)
        self.keep_last = int(keep_last)
        self.keep_period = keep_period

    # === Listing ===

    def steps(self):
        """The steps of the complete checkpoints, ascending."""
        if not self.directory.is_dir():
            return []
        return sorted(
            int(path.name)
            for path in self.directory.iterdir()
            if path.name.isdigit() and (path / STATE_FILE).is_file()
        )

    def latest_step(self):
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step):
        return self.directory / str(int(step))

    # === Saving ===

    def save(self, step, model, *, data_state=None, norm_stats=None, asset_id=None, config=None):
        """Writes checkpoint `step` atomically, then prunes older ones.

        Args:
            step: the number of optimizer steps taken.
            model: the model (its optimizer, if compiled and built, is saved too).
            data_state: the data loader's position (`DataLoader.state(...)`).
            norm_stats: `{key: NormStats}` written to `assets/<asset_id>/norm_stats.json`.
            asset_id: the norm stats' asset id (default `default`).
            config: the `TrainConfig` (stored as data in `state.json`).

        Returns:
            the step's directory.
        """
        from keras_openpi.data.normalize import save_norm_stats

        step = int(step)
        weights = {k: _host_value(v) for k, v in by_path(model.variables, "model").items()}
        ema = {variable.path: _host_value(average) for variable, average in _ema_pairs(model)}
        optimizer = {k: _host_value(v) for k, v in _optimizer_variables(model).items()}
        final = self.step_dir(step)
        if _process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_hidden()
            partial = self.directory / f".partial-{step}-{uuid.uuid4().hex[:8]}"
            partial.mkdir()
            (partial / MODEL_FILE).write_text(json.dumps(model_spec(model), indent=1))
            _write_arrays(partial / WEIGHTS_FILE, weights)
            if ema:
                _write_arrays(partial / EMA_FILE, ema)
            if optimizer:
                _write_arrays(partial / OPTIMIZER_FILE, optimizer)
            if norm_stats:
                save_norm_stats(partial / ASSETS_DIR / (asset_id or "default"), norm_stats)
            state = {
                "format": FORMAT,
                "step": step,
                "data": data_state,
                "ema": bool(ema),
                "asset_id": (asset_id or "default") if norm_stats else None,
                "config": config.to_dict() if config is not None else None,
                "keras_version": keras.__version__,
                "time": time.time(),
            }
            (partial / STATE_FILE).write_text(json.dumps(state, indent=1))
            _fsync_dir(partial)
            replaced = None
            if final.exists():
                replaced = self.directory / f".replaced-{step}-{uuid.uuid4().hex[:8]}"
                os.rename(final, replaced)
            os.rename(partial, final)
            _fsync_dir(self.directory)
            if replaced is not None:
                shutil.rmtree(replaced)
            self.prune()
        _sync(f"keras_openpi_checkpoint_{step}")
        return final

    def _remove_hidden(self):
        """Removes what interrupted saves and deletions left behind."""
        for path in self.directory.iterdir():
            if path.name.startswith(_HIDDEN):
                shutil.rmtree(path, ignore_errors=True)

    def prune(self):
        """Deletes the checkpoints neither among the last `keep_last` nor on `keep_period`."""
        steps = self.steps()
        keep = set(steps[-self.keep_last :])
        if self.keep_period:
            keep |= {s for s in steps if s % self.keep_period == 0}
        for step in steps:
            if step not in keep:
                doomed = self.directory / f".deleting-{step}-{uuid.uuid4().hex[:8]}"
                os.rename(self.step_dir(step), doomed)
                shutil.rmtree(doomed)

    # === Restoring ===

    def read_state(self, step=None):
        """`state.json` of checkpoint `step` (default the latest)."""
        step = self._resolve(step)
        return json.loads((self.step_dir(step) / STATE_FILE).read_text())

    def _resolve(self, step):
        steps = self.steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}.")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {self.directory}; it has {steps}."
            )
        return int(step)

    def restore(self, model, step=None):
        """Restores the model's weights, its EMA and optimizer state from checkpoint `step`.

        The model must be built as it was when saved (same config and
        fine-tuning strategy) and compiled with the same optimizer; the
        optimizer is built here if it is not yet.

        Returns:
            the checkpoint's `state.json` dict (`step`, `data`, `config`, ...).
        """
        step = self._resolve(step)
        path = self.step_dir(step)
        state = json.loads((path / STATE_FILE).read_text())
        weights = by_path(model.variables, "model")
        _assign(weights, _read_arrays(path / WEIGHTS_FILE), path / WEIGHTS_FILE, "model")
        optimizer = getattr(model, "optimizer", None)
        if (path / OPTIMIZER_FILE).is_file():
            if optimizer is None:
                raise ValueError(
                    f"{path} holds optimizer state; compile the model before restoring."
                )
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            named = _optimizer_variables(model)
            _assign(named, _read_arrays(path / OPTIMIZER_FILE), path / OPTIMIZER_FILE, "optimizer")
        pairs = _ema_pairs(model)
        if state.get("ema") != bool(pairs):
            raise ValueError(
                f"{path} was saved {'with' if state.get('ema') else 'without'} EMA; the model's "
                f"optimizer has it {'on' if pairs else 'off'} (ema_decay must match)."
            )
        if pairs:
            averages = {variable.path: average for variable, average in pairs}
            _assign(averages, _read_arrays(path / EMA_FILE), path / EMA_FILE, "EMA")
        return state


# === Loading for inference and serving ===


def find_step_dir(path):
    """`path` if it is a step directory, else the latest step directory in it."""
    path = pathlib.Path(path)
    if (path / STATE_FILE).is_file():
        return path
    step = CheckpointManager(path).latest_step()
    if step is None:
        raise FileNotFoundError(f"no training checkpoint in {path}.")
    return path / str(step)


def is_training_checkpoint(path):
    """Whether `path` is a step directory or a directory of step checkpoints."""
    path = pathlib.Path(path)
    return path.is_dir() and (
        (path / STATE_FILE).is_file() or CheckpointManager(path).latest_step() is not None
    )


def checkpoint_norm_stats_dirs(path):
    """Where a checkpoint's norm stats are: its step's `assets/` (openpi's layout)."""
    return [find_step_dir(path) / ASSETS_DIR]


def load_checkpoint_model(path, use_ema=True):
    """The model of a training checkpoint with its inference weights.

    Args:
        path: a step directory, or a run directory (its latest step).
        use_ema: use the EMA of the trainable weights when the checkpoint has
            one (openpi's inference `params`); False gives the raw weights.

    Returns:
        the model (not compiled).
    """
    step_dir = find_step_dir(path)
    spec = json.loads((step_dir / MODEL_FILE).read_text())
    model = keras.saving.deserialize_keras_object(spec)
    arrays = _read_arrays(step_dir / WEIGHTS_FILE)
    if use_ema and (step_dir / EMA_FILE).is_file():
        arrays.update(_read_arrays(step_dir / EMA_FILE))
    _assign(by_path(model.variables, "model"), arrays, step_dir / WEIGHTS_FILE, "model")
    return model
