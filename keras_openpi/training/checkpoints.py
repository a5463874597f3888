"""Writing, pruning and restoring the step checkpoints of a training run.

The layout and its reading live in `keras_openpi.checkpoint_format` (shared
with serving). A save is collective: on several processes (JAX's
multi-controller runtime) every process calls it, and

1. process 0 removes what interrupted saves left and makes the hidden
   folder `.partial-<step>`;
2. every process writes the shards it holds of the weights, their EMA and
   the optimizer state into its `arrays/` (orbax, OCDBT) and hashes the
   files it wrote;
3. once all have, process 0 writes `model.json`, the norm stats,
   `state.json` and, last, `manifest.json` (every file's size and sha256),
   and renames the folder to `<step>`.

So a checkpoint is visible only when every process's shards are in it; a
crash of any process leaves at most a hidden folder, which the next save
removes. A save that fails (a full disk) removes its folder and says what
it was writing. No checkpoint is written from non-finite weights (checked
where the weights are, without gathering them). Restoring reads onto the
model's own mesh, which may differ from the saving run's (8 devices → 4, 2
processes → 1).
"""

import json
import os
import pathlib
import re
import shutil
import time
import uuid

import keras
import numpy as np

import keras_openpi.models  # noqa: F401  registers the classes a checkpoint's model.json names
from keras_openpi.backend.keras_private import ema_pairs
from keras_openpi.backend.multiprocess import broadcast_int
from keras_openpi.backend.multiprocess import finite_flags
from keras_openpi.backend.multiprocess import process_count
from keras_openpi.backend.multiprocess import process_index
from keras_openpi.backend.multiprocess import sync
from keras_openpi.checkpoint_arrays import ARRAYS_DIR
from keras_openpi.checkpoint_arrays import EMA_ITEM
from keras_openpi.checkpoint_arrays import OPTIMIZER_ITEM
from keras_openpi.checkpoint_arrays import WEIGHTS_ITEM
from keras_openpi.checkpoint_arrays import ArraysError
from keras_openpi.checkpoint_arrays import write_items
from keras_openpi.checkpoint_format import ASSETS_DIR
from keras_openpi.checkpoint_format import EMA_DIR
from keras_openpi.checkpoint_format import FORMAT
from keras_openpi.checkpoint_format import MANIFEST_FILE
from keras_openpi.checkpoint_format import MODEL_ASSETS_DIR
from keras_openpi.checkpoint_format import MODEL_FILE
from keras_openpi.checkpoint_format import OPTIMIZER_DIR
from keras_openpi.checkpoint_format import STATE_FILE
from keras_openpi.checkpoint_format import WEIGHTS_DIR
from keras_openpi.checkpoint_format import CheckpointError
from keras_openpi.checkpoint_format import by_path
from keras_openpi.checkpoint_format import check_arrays
from keras_openpi.checkpoint_format import checkpoint_problem
from keras_openpi.checkpoint_format import checkpoint_steps
from keras_openpi.checkpoint_format import file_digests
from keras_openpi.checkpoint_format import fsync_dir
from keras_openpi.checkpoint_format import holds
from keras_openpi.checkpoint_format import load_checkpoint_model  # noqa: F401 (public here too)
from keras_openpi.checkpoint_format import read_json
from keras_openpi.checkpoint_format import read_state
from keras_openpi.checkpoint_format import restore_variables
from keras_openpi.checkpoint_format import save_model_assets
from keras_openpi.checkpoint_format import stored_specs
from keras_openpi.checkpoint_format import write_manifest
from keras_openpi.checkpoint_format import write_text
from keras_openpi.training.errors import CheckpointWriteError
from keras_openpi.training.errors import NonFiniteError

# Hidden folders of saves, replacements and deletions in progress (removed by the next save).
HIDDEN_PREFIXES = (".partial-", ".replaced-", ".deleting-")
# orbax writes process i's shards under `<item>/ocdbt.process_<i>/`.
_PROCESS_FILES = re.compile(r"/ocdbt\.process_(\d+)/")


def _ema_pairs(model):
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


def _values(variables):
    """What is written of each variable: its JAX array where it is (sharded or not), else numpy."""
    if keras.backend.backend() == "jax":
        return [variable.value for variable in variables]
    return [np.asarray(keras.ops.convert_to_numpy(variable.value)) for variable in variables]


def _hashed_by(name, count):
    """The process that hashes the checkpoint file `name`: its writer's, else process 0."""
    match = _PROCESS_FILES.search(name)
    return int(match.group(1)) % count if match else 0


def model_spec(model):
    """The JSON-able class and config that rebuild `model` (without its training setup)."""
    spec = keras.saving.serialize_keras_object(model)
    spec.pop("compile_config", None)
    return spec


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
        groups = (
            (WEIGHTS_ITEM, "weight", by_path(model.variables, "model")),
            (EMA_ITEM, "EMA weight", {v.path: average for v, average in _ema_pairs(model)}),
            (OPTIMIZER_ITEM, "optimizer value", _optimizer_variables(model)),
        )
        named = [(what, name) for _, what, variables in groups for name in variables]
        values = _values([v for _, _, variables in groups for v in variables.values()])
        flags = finite_flags(values)
        if not all(flags):
            what, name = named[flags.index(False)]
            raise NonFiniteError(
                f"step {step}: the {what} {name!r} is NaN or infinite, so checkpoint {step} "
                f"was not written; the newest good checkpoint is {self._newest_text()}."
            )
        items, start = {}, 0
        for item, _, variables in groups:
            if variables or item == WEIGHTS_ITEM:
                items[item] = dict(zip(variables, values[start : start + len(variables)]))
            start += len(variables)
        state = {
            "format": FORMAT,
            "step": step,
            "data": data_state,
            "ema": EMA_ITEM in items,
            "asset_id": (asset_id or "default") if norm_stats else None,
            "config": config.to_dict() if config is not None else None,
            "keras_version": keras.__version__,
            "processes": process_count(),
            "time": time.time(),
            **(extra_state or {}),
        }
        final = self.step_dir(step)
        self._write(step, final, model, items, norm_stats, asset_id, state)
        return final

    def _write(self, step, final, model, items, norm_stats, asset_id, state):
        from keras_openpi.data.normalize import FILE_NAME
        from keras_openpi.data.normalize import norm_stats_to_json

        index, count = process_index(), process_count()
        partial = self.directory / f".partial-{step}"
        path, replaced = self.directory, None
        try:
            if index == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._remove_hidden()
                partial.mkdir()
            sync(f"keras_openpi_checkpoint_{step}_folder")
            path = partial / ARRAYS_DIR
            write_items(path, items)
            digests = self._hash_own_files(partial, index, count)
            sync(f"keras_openpi_checkpoint_{step}_arrays")
            if index == 0:
                for other in range(1, count):
                    shared = partial / f".digests-{other}.json"
                    digests.update(read_json(shared))
                    shared.unlink()
                path = partial / MODEL_FILE
                write_text(path, json.dumps(model_spec(model), indent=1))
                path = partial / MODEL_ASSETS_DIR
                save_model_assets(model, path)
                if norm_stats:
                    path = partial / ASSETS_DIR / (asset_id or "default") / FILE_NAME
                    path.parent.mkdir(parents=True)
                    write_text(path, norm_stats_to_json(norm_stats))
                path = partial / STATE_FILE
                write_text(path, json.dumps(state, indent=1))
                path = partial / MANIFEST_FILE
                write_manifest(partial, digests=digests, step=step)
                fsync_dir(partial)
                path = final
                if final.exists():
                    replaced = self.directory / f".replaced-{step}-{uuid.uuid4().hex[:8]}"
                    os.rename(final, replaced)
                os.rename(partial, final)
                fsync_dir(self.directory)
        except (OSError, ArraysError, CheckpointError) as error:
            shutil.rmtree(partial, ignore_errors=True)
            if replaced is not None and not final.exists():
                os.rename(replaced, final)  # put back the checkpoint this one was to replace
            reason = getattr(error, "strerror", None) or str(error)
            failure = CheckpointWriteError(
                getattr(error, "errno", None),
                f"checkpoint {step} was not written: {reason} while writing {path}; nothing of it "
                f"was left behind and the newest checkpoint is {self._newest_text()}.",
            )
        else:
            failure = None
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            if index == 0:
                self.prune(keep=step)
        # Every process learns whether process 0 completed the checkpoint (a barrier too).
        if broadcast_int(failure is not None) and failure is None:
            failure = CheckpointWriteError(
                None, f"checkpoint {step} was not written: process 0 failed (see its log)."
            )
        if failure is not None:
            raise failure

    @staticmethod
    def _hash_own_files(partial, index, count):
        """Sizes and sha256 of the array files this process hashes (process i > 0: to a file)."""
        names = sorted(
            p.relative_to(partial).as_posix()
            for p in (partial / ARRAYS_DIR).rglob("*")
            if p.is_file()
        )
        digests = file_digests(partial, [n for n in names if _hashed_by(n, count) == index])
        if index > 0:
            write_text(partial / f".digests-{index}.json", json.dumps(digests))
            return {}
        return digests

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
        optimizer = getattr(model, "optimizer", None)
        has_optimizer = holds(path, OPTIMIZER_DIR)
        if has_optimizer and optimizer is None:
            raise CheckpointError(
                f"{path} holds optimizer state; compile the model before restoring."
            )
        if not has_optimizer and optimizer is not None:
            raise CheckpointError(
                f"{path} holds no optimizer state ({OPTIMIZER_DIR}): restoring it would restart "
                "the optimizer (warm-up, Adam moments) while keeping the trained weights."
            )
        weights = by_path(model.variables, "model")
        check_arrays(weights, stored_specs(path, WEIGHTS_DIR), path / WEIGHTS_DIR, "model")
        groups = [(WEIGHTS_DIR, weights)]
        if optimizer is not None:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            named = _optimizer_variables(model)
            specs = stored_specs(path, OPTIMIZER_DIR)
            check_arrays(named, specs, path / OPTIMIZER_DIR, "optimizer")
            groups.append((OPTIMIZER_DIR, named))
        pairs = _ema_pairs(model)
        if state.get("ema") != bool(pairs):
            raise CheckpointError(
                f"{path} was saved {'with' if state.get('ema') else 'without'} EMA; the model's "
                f"optimizer has it {'on' if pairs else 'off'} (ema_decay must match)."
            )
        if pairs:
            averages = {variable.path: average for variable, average in pairs}
            check_arrays(averages, stored_specs(path, EMA_DIR), path / EMA_DIR, "EMA")
            groups.append((EMA_DIR, averages))
        restore_variables(path, groups)
        return state
