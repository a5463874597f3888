"""Writing, pruning and restoring the step checkpoints of a training run.

The layout and its reading live in `keras_openpi.checkpoint_format` (shared
with serving). A checkpoint is written into a hidden `.partial-*` folder,
its `manifest.json` (every file's size and sha256) last, then renamed to
`<step>`; a save that fails (a full disk) removes its folder and says which
file it was writing, and a crash leaves at most a hidden folder, which the
next save removes. No checkpoint is written from non-finite weights.

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

from keras_openpi.checkpoint_format import ASSETS_DIR
from keras_openpi.checkpoint_format import EMA_FILE
from keras_openpi.checkpoint_format import FORMAT
from keras_openpi.checkpoint_format import MANIFEST_FILE
from keras_openpi.checkpoint_format import MODEL_ASSETS_DIR
from keras_openpi.checkpoint_format import MODEL_FILE
from keras_openpi.checkpoint_format import OPTIMIZER_FILE
from keras_openpi.checkpoint_format import STATE_FILE
from keras_openpi.checkpoint_format import WEIGHTS_FILE
from keras_openpi.checkpoint_format import CheckpointError
from keras_openpi.checkpoint_format import assign_arrays
from keras_openpi.checkpoint_format import by_path
from keras_openpi.checkpoint_format import checkpoint_problem
from keras_openpi.checkpoint_format import checkpoint_steps
from keras_openpi.checkpoint_format import fsync_dir
from keras_openpi.checkpoint_format import load_checkpoint_model  # noqa: F401 (public here too)
from keras_openpi.checkpoint_format import manifest_files
from keras_openpi.checkpoint_format import read_arrays
from keras_openpi.checkpoint_format import read_state
from keras_openpi.checkpoint_format import save_model_assets
from keras_openpi.checkpoint_format import write_arrays
from keras_openpi.checkpoint_format import write_manifest
from keras_openpi.checkpoint_format import write_text
from keras_openpi.training.errors import CheckpointWriteError
from keras_openpi.training.errors import NonFiniteError

# Hidden folders of saves, replacements and deletions in progress (removed by the next save).
HIDDEN_PREFIXES = (".partial-", ".replaced-", ".deleting-")


# === Values on the host ===


def _host_value(variable):
    """The variable's value as a numpy array on the host (gathered across hosts if sharded)."""
    value = variable.value
    if keras.backend.backend() == "jax":
        import jax

        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(keras.ops.convert_to_numpy(value))


def first_non_finite(arrays):
    """The first name in `{name: array}` whose float array holds NaN or inf, or None."""
    for name, array in arrays.items():
        if array.dtype.kind not in "biu" and not np.all(np.isfinite(array)):
            return name
    return None


def _ema_pairs(model):
    from keras_openpi.backend.keras_private import ema_pairs

    optimizer = getattr(model, "optimizer", None)
    return ema_pairs(optimizer) if optimizer is not None else []


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


def process_index():
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index()
    return 0


def sync_processes(name):
    """Waits for every process (on several hosts); a no-op on one."""
    if keras.backend.backend() == "jax":
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)


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
        """The steps of the complete checkpoints (manifest and file sizes checked), ascending."""
        return checkpoint_steps(self.directory)

    def latest_step(self):
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step):
        return self.directory / str(int(step))

    # === Saving ===

    def save(
        self,
        step,
        model,
        *,
        data_state=None,
        norm_stats=None,
        asset_id=None,
        config=None,
        extra_state=None,
    ):
        """Writes checkpoint `step` atomically, then prunes older ones.

        Args:
            step: the number of optimizer steps taken.
            model: the model (its optimizer, if compiled and built, is saved too).
            data_state: the data loader's position (`DataLoader.state(...)`).
            norm_stats: `{key: NormStats}` written to `assets/<asset_id>/norm_stats.json`.
            asset_id: the norm stats' asset id (default `default`).
            config: the `TrainConfig` (stored as data in `state.json`).
            extra_state: more JSON-able entries for `state.json`.

        Returns:
            the step's directory.

        Raises:
            NonFiniteError: a weight, EMA or optimizer value is NaN or inf
                (nothing is written).
            CheckpointWriteError: a file could not be written (e.g. the disk
                is full); the partial folder is removed, earlier checkpoints
                are intact.
        """
        step = int(step)
        weights = {k: _host_value(v) for k, v in by_path(model.variables, "model").items()}
        ema = {variable.path: _host_value(average) for variable, average in _ema_pairs(model)}
        optimizer = {k: _host_value(v) for k, v in _optimizer_variables(model).items()}
        for what, arrays in (
            ("weight", weights),
            ("EMA weight", ema),
            ("optimizer value", optimizer),
        ):
            name = first_non_finite(arrays)
            if name is not None:
                raise NonFiniteError(
                    f"step {step}: the {what} {name!r} is NaN or infinite, so checkpoint {step} "
                    f"was not written; the newest good checkpoint is {self._newest_text()}."
                )
        state = {
            "format": FORMAT,
            "step": step,
            "data": data_state,
            "ema": bool(ema),
            "asset_id": (asset_id or "default") if norm_stats else None,
            "config": config.to_dict() if config is not None else None,
            "keras_version": keras.__version__,
            "time": time.time(),
            **(extra_state or {}),
        }
        final = self.step_dir(step)
        if process_index() == 0:
            arrays = {WEIGHTS_FILE: weights, EMA_FILE: ema, OPTIMIZER_FILE: optimizer}
            self._write(step, final, model, arrays, norm_stats, asset_id, state)
            self.prune(keep=step)
        sync_processes(f"keras_openpi_checkpoint_{step}")
        return final

    def _write(self, step, final, model, arrays, norm_stats, asset_id, state):
        from keras_openpi.data.normalize import FILE_NAME
        from keras_openpi.data.normalize import norm_stats_to_json

        partial = self.directory / f".partial-{step}-{uuid.uuid4().hex[:8]}"
        path, replaced = self.directory, None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_hidden()
            path = partial
            partial.mkdir()
            path = partial / MODEL_FILE
            write_text(path, json.dumps(model_spec(model), indent=1))
            path = partial / MODEL_ASSETS_DIR
            save_model_assets(model, path)
            for name, values in arrays.items():
                if values or name == WEIGHTS_FILE:
                    path = partial / name
                    write_arrays(path, values)
            if norm_stats:
                path = partial / ASSETS_DIR / (asset_id or "default") / FILE_NAME
                path.parent.mkdir(parents=True)
                write_text(path, norm_stats_to_json(norm_stats))
            path = partial / STATE_FILE
            write_text(path, json.dumps(state, indent=1))
            path = partial / MANIFEST_FILE
            write_manifest(partial, step=step)
            fsync_dir(partial)
            path = final
            if final.exists():
                replaced = self.directory / f".replaced-{step}-{uuid.uuid4().hex[:8]}"
                os.rename(final, replaced)
            os.rename(partial, final)
            fsync_dir(self.directory)
        except OSError as error:
            shutil.rmtree(partial, ignore_errors=True)
            if replaced is not None and not final.exists():
                os.rename(replaced, final)  # put back the checkpoint this one was to replace
            reason = error.strerror or str(error)
            raise CheckpointWriteError(
                error.errno,
                f"checkpoint {step} was not written: {reason} while writing {path}; nothing of it "
                f"was left behind and the newest checkpoint is {self._newest_text()}.",
            ) from None
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    def _newest_text(self):
        step = self.latest_step()
        return "none" if step is None else f"{self.step_dir(step)}"

    def _remove_hidden(self):
        """Removes what interrupted saves and deletions left behind."""
        for path in self.directory.iterdir():
            if path.name.startswith(HIDDEN_PREFIXES):
                shutil.rmtree(path, ignore_errors=True)

    def prune(self, keep=None):
        """Deletes the checkpoints neither among the last `keep_last` nor on `keep_period`.

        The newest checkpoint and step `keep` (the one just written) are never deleted.
        """
        steps = self.steps()
        kept = set(steps[-self.keep_last :])
        if self.keep_period:
            kept |= {s for s in steps if s % self.keep_period == 0}
        if keep is not None:
            kept.add(int(keep))
        for step in steps:
            if step not in kept:
                doomed = self.directory / f".deleting-{step}-{uuid.uuid4().hex[:8]}"
                os.rename(self.step_dir(step), doomed)
                shutil.rmtree(doomed)

    # === Restoring ===

    def read_state(self, step=None):
        """`state.json` of checkpoint `step` (default the latest)."""
        return read_state(self.step_dir(self._resolve(step)))

    def _resolve(self, step):
        steps = self.steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}.")
            return steps[-1]
        if int(step) not in steps:
            problem = checkpoint_problem(self.step_dir(step))
            why = (
                f" (checkpoint {step}: {problem})"
                if problem and self.step_dir(step).exists()
                else ""
            )
            raise FileNotFoundError(
                f"no complete checkpoint of step {step} in {self.directory}{why}; the complete "
                f"ones are {steps}."
            )
        return int(step)

    def restore(self, model, step=None, verify=True):
        """Restores the model's weights, its EMA and optimizer state from checkpoint `step`.

        The model must be built as it was when saved (same config and
        fine-tuning strategy) and compiled with the same optimizer; the
        optimizer is built here if it is not yet.

        Args:
            model: the model to restore into.
            step: the checkpoint's step (default the latest complete one).
            verify: compare every file's sha256 with the manifest first.

        Returns:
            the checkpoint's `state.json` dict (`step`, `data`, `config`, ...).

        Raises:
            CheckpointError: the checkpoint is corrupt or does not fit the model.
        """
        step = self._resolve(step)
        path = self.step_dir(step)
        if verify:
            problem = checkpoint_problem(path, checksums=True)
            if problem:
                raise CheckpointError(f"checkpoint {path} is not complete: {problem}.")
        state = read_state(path)
        files = manifest_files(path)
        optimizer = getattr(model, "optimizer", None)
        if OPTIMIZER_FILE in files and optimizer is None:
            raise CheckpointError(
                f"{path} holds optimizer state; compile the model before restoring."
            )
        if OPTIMIZER_FILE not in files and optimizer is not None:
            raise CheckpointError(
                f"{path} holds no {OPTIMIZER_FILE}: restoring it would restart the optimizer "
                "(warm-up, Adam moments) while keeping the trained weights."
            )
        weights = by_path(model.variables, "model")
        assign_arrays(weights, read_arrays(path / WEIGHTS_FILE), path / WEIGHTS_FILE, "model")
        if optimizer is not None:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            named = _optimizer_variables(model)
            arrays = read_arrays(path / OPTIMIZER_FILE)
            assign_arrays(named, arrays, path / OPTIMIZER_FILE, "optimizer")
        pairs = _ema_pairs(model)
        if state.get("ema") != bool(pairs):
            raise CheckpointError(
                f"{path} was saved {'with' if state.get('ema') else 'without'} EMA; the model's "
                f"optimizer has it {'on' if pairs else 'off'} (ema_decay must match)."
            )
        if pairs:
            averages = {variable.path: average for variable, average in pairs}
            assign_arrays(averages, read_arrays(path / EMA_FILE), path / EMA_FILE, "EMA")
        return state
