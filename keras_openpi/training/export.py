"""A run's served-ready export: `export/policy.keras` and its `norm_stats.json`, written atomically.

    <checkpoint_dir>/export/
      policy.keras        the policy (EMA weights when on, no optimizer state)
      norm_stats.json     the stats it was trained with
      manifest.json       format, the checkpoint step it holds, every file's size and sha256

The export is written into a hidden folder next to it and renamed into
place, so an interrupted export leaves the previous one (or none), never half
of one; `keras-openpi export-policy RUN_DIR` (`export_checkpoint`) redoes it
from the newest complete checkpoint. No export is written from non-finite weights.
"""

import contextlib
import os
import pathlib
import shutil
import uuid

import keras

from keras_openpi.checkpoint_format import ASSETS_DIR
from keras_openpi.checkpoint_format import MANIFEST_FILE
from keras_openpi.checkpoint_format import CheckpointError
from keras_openpi.checkpoint_format import find_step_dir
from keras_openpi.checkpoint_format import fsync_dir
from keras_openpi.checkpoint_format import load_checkpoint_model
from keras_openpi.checkpoint_format import manifest_problem
from keras_openpi.checkpoint_format import read_json
from keras_openpi.checkpoint_format import step_dirs
from keras_openpi.checkpoint_format import write_manifest
from keras_openpi.checkpoint_format import write_text
from keras_openpi.training.errors import CheckpointWriteError
from keras_openpi.training.errors import NonFiniteError
from keras_openpi.training.run_dir import EXPORT_DIR
from keras_openpi.training.run_dir import EXPORT_MODEL
from keras_openpi.training.run_dir import NORM_STATS_FILE
from keras_openpi.training.run_dir import is_export_dir

EXPORT_FORMAT = "keras_openpi.policy_export/1"


@contextlib.contextmanager
def without_training_state(model):
    """Hides the optimizer and compile settings, e.g. to save a `.keras` file of the policy."""
    if not getattr(model, "compiled", False):
        yield model
        return
    optimizer, compiled = model.optimizer, model.compiled
    model.optimizer, model.compiled = None, False
    try:
        yield model
    finally:
        model.optimizer, model.compiled = optimizer, compiled


def first_non_finite_variable(model):
    """The path of the model's first float variable holding NaN or inf, or None."""
    for variable in model.variables:
        if "float" in keras.backend.standardize_dtype(variable.dtype):
            if not bool(keras.ops.all(keras.ops.isfinite(variable.value))):
                return variable.path
    return None


def export_policy(model, norm_stats, directory, step=None, source=None):
    """Writes `policy.keras`, `norm_stats.json` and a manifest to `directory`, atomically.

    Args:
        model: the policy (its optimizer, if any, is left out of the file).
        norm_stats: `{key: NormStats}` it was trained with (None: no stats file).
        directory: the export folder; an existing one is replaced when it
            holds only an export's files.
        step: the training step the weights are from (stored in the manifest).
        source: where they come from (stored in the manifest).

    Returns:
        the `.keras` file's path.

    Raises:
        NonFiniteError: a weight is NaN or inf (nothing is written).
        ValueError: `directory` holds files that are not an export's.
        CheckpointWriteError: a file could not be written; the previous
            export, if any, is intact.
    """
    from keras_openpi.data.normalize import norm_stats_to_json

    directory = pathlib.Path(directory)
    name = first_non_finite_variable(model)
    if name is not None:
        raise NonFiniteError(
            f"the weight {name!r} is NaN or infinite, so no policy was exported to {directory}."
        )
    if directory.exists() and not is_export_dir(directory):
        raise ValueError(
            f"{directory} holds files that are not an export's "
            f"({sorted(os.listdir(directory))[:5]}): choose an empty or new folder."
        )
    partial = directory.with_name(f".partial-{directory.name}-{uuid.uuid4().hex[:8]}")
    path, replaced = directory.parent, None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        path = partial
        partial.mkdir()
        path = partial / EXPORT_MODEL
        with without_training_state(model):
            model.save(path)
        if norm_stats:
            path = partial / NORM_STATS_FILE
            write_text(path, norm_stats_to_json(norm_stats))
        path = partial / MANIFEST_FILE
        write_manifest(partial, EXPORT_FORMAT, step=step, source=source)
        fsync_dir(partial)
        path = directory
        if directory.exists():
            replaced = directory.with_name(f".replaced-{directory.name}-{uuid.uuid4().hex[:8]}")
            os.rename(directory, replaced)
        os.rename(partial, directory)
        fsync_dir(directory.parent)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        if replaced is not None and not directory.exists():
            os.rename(replaced, directory)
        raise CheckpointWriteError(
            error.errno,
            f"the policy was not exported: {error.strerror or error} while writing {path}; "
            f"nothing of it was left behind and {directory} is as it was.",
        ) from None
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return directory / EXPORT_MODEL


def export_step(directory):
    """The checkpoint step of the complete export in `directory`, or None (missing, incomplete)."""
    directory = pathlib.Path(directory)
    if manifest_problem(directory, EXPORT_FORMAT, (EXPORT_MODEL,)) is not None:
        return None
    return read_json(directory / MANIFEST_FILE).get("step")


def checkpoint_norm_stats(step_dir):
    """The `{key: NormStats}` of a checkpoint (`assets/<asset_id>/norm_stats.json`), or None."""
    from keras_openpi.data.normalize import load_norm_stats

    files = sorted((pathlib.Path(step_dir) / ASSETS_DIR).glob(f"*/{NORM_STATS_FILE}"))
    if len(files) > 1:
        raise CheckpointError(
            f"{step_dir} holds several norm stats files: {[str(f) for f in files]}."
        )
    return load_norm_stats(files[0]) if files else None


def export_checkpoint(run_dir, step=None, output=None, use_ema=True):
    """Exports a run's checkpoint (default its newest complete one) with its norm stats.

    Args:
        run_dir: the run's checkpoint directory.
        step: the step to export (default the newest complete checkpoint).
        output: the export folder (default `<run_dir>/export`).
        use_ema: the EMA weights when the checkpoint has them.

    Returns:
        `(path of policy.keras, step, norm stats found)`.
    """
    run_dir = pathlib.Path(run_dir)
    if step is not None and not (run_dir / str(int(step))).is_dir():
        raise CheckpointError(
            f"no checkpoint of step {step} in {run_dir}; it has steps {step_dirs(run_dir)}."
        )
    step_dir = find_step_dir(run_dir if step is None else run_dir / str(int(step)))
    model = load_checkpoint_model(step_dir, use_ema=use_ema)
    norm_stats = checkpoint_norm_stats(step_dir)
    output = pathlib.Path(output) if output else step_dir.parent / EXPORT_DIR
    path = export_policy(model, norm_stats, output, step=int(step_dir.name), source=str(step_dir))
    return path, int(step_dir.name), norm_stats is not None
