"""The training-checkpoint format: its layout, its manifest, and reading it.

Training writes it (`keras_openpi.training.checkpoints.CheckpointManager`);
serving and `keras-openpi export-policy` read it. Both import this module and
it imports neither, so the format has one home below both.

    <run_dir>/
      <step>/                           one checkpoint, e.g. 1000/
        manifest.json                   the format, the step, and every other file's
                                        size and sha256 (written last, by process 0)
        model.json                      the model (class and config, fine-tuning included)
        arrays/                         orbax (OCDBT), written by every process
          model_weights/                every model variable by path: LoRA adapters unmerged,
                                        frozen weights in their dtype, the noise generator's state
          ema_weights/                  the EMA of the trainable weights (with EMA on)
          optimizer/                    the other optimizer variables (step count, Adam moments)
        state.json                      step, data-iterator position, train config
        assets/<asset_id>/norm_stats.json
        model_assets/<layer>/           files a layer keeps beside its weights (Keras'
                                        `save_assets`: π0-FAST's tokenizer)

The arrays are in orbax's OCDBT format (`keras_openpi.checkpoint_arrays`):
on several hosts each process writes the shards it holds, and the
checkpoint reads back onto any mesh and process count. A step directory is
a checkpoint when its `manifest.json` names this format and its step and
every file it lists is there with the listed size (`checkpoint_problem`);
with `checksums=True` the files' sha256 must match too and `state.json`
must parse. Anything else (a folder a crash left, a file deleted, truncated
or changed) is not a checkpoint: listing skips it, and loading a run
directory falls back to the newest complete checkpoint and warns. The
inference weights of a step are its EMA weights (with EMA on) over the
model weights, as openpi's `params`.
"""

import hashlib
import json
import os
import pathlib
import warnings

import keras

from keras_openpi.checkpoint_arrays import ARRAYS_DIR
from keras_openpi.checkpoint_arrays import EMA_ITEM
from keras_openpi.checkpoint_arrays import OPTIMIZER_ITEM
from keras_openpi.checkpoint_arrays import WEIGHTS_ITEM
from keras_openpi.checkpoint_arrays import ArraysError
from keras_openpi.checkpoint_arrays import array_specs
from keras_openpi.checkpoint_arrays import read_items

FORMAT = "keras_openpi.train_checkpoint/3"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
MODEL_FILE = "model.json"
ASSETS_DIR = "assets"
MODEL_ASSETS_DIR = "model_assets"
# The folders of the arrays, relative to a step directory.
WEIGHTS_DIR = f"{ARRAYS_DIR}/{WEIGHTS_ITEM}"
EMA_DIR = f"{ARRAYS_DIR}/{EMA_ITEM}"
OPTIMIZER_DIR = f"{ARRAYS_DIR}/{OPTIMIZER_ITEM}"
# Files (or folders: every file in them) a checkpoint's manifest must list.
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, WEIGHTS_DIR)
# Loading for inference reads no optimizer state, so it does not checksum it.
INFERENCE_UNCHECKED = (OPTIMIZER_DIR,)


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or does not fit what it is loaded into."""


class CheckpointFallbackWarning(UserWarning):
    """Newer checkpoints of a run were skipped (incomplete or corrupt) for an older complete one."""


# === Files ===


def write_text(path, text):
    """Writes `text` to `path` and flushes it to disk."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def read_json(path):
    """The JSON in `path`; a missing or malformed file raises a CheckpointError naming it."""
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def sha256(path):
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# sha256 of the files read in this process, by (path, size, mtime): a checkpoint that
# serving loads and then searches for norm stats is read once.
_DIGESTS = {}


def _sha256(path):
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        if len(_DIGESTS) > 256:
            _DIGESTS.clear()
        _DIGESTS[key] = sha256(path)
    return _DIGESTS[key]


def fsync_dir(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# === Manifest ===


def _under(name, prefixes):
    """Whether the relative file `name` is one of `prefixes` or inside one of them."""
    return any(name == prefix or name.startswith(prefix + "/") for prefix in prefixes)


def file_digests(directory, names):
    """`{name: {"bytes", "sha256"}}` of the files `names` (relative to `directory`)."""
    directory = pathlib.Path(directory)
    return {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name)}
        for name in names
    }


def write_manifest(directory, fmt=FORMAT, digests=None, **fields):
    """Writes `manifest.json` listing every file under `directory` with its size and sha256.

    Args:
        directory: the folder, complete but for its manifest.
        fmt: the format it is in.
        digests: `{name: {"bytes", "sha256"}}` already computed (e.g. by the
            processes that wrote those files); the other files are read here.
        **fields: more JSON-able entries (e.g. `step`).

    Returns:
        the manifest dict.
    """
    directory = pathlib.Path(directory)
    digests = digests or {}
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    names = [name for name in names if name != MANIFEST_FILE]
    files = file_digests(directory, [name for name in names if name not in digests])
    files = {name: files.get(name) or digests[name] for name in names}
    manifest = {"format": fmt, **fields, "files": files}
    write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return manifest


def _missing(directory, name):
    """The shallowest missing part of the relative path `name` (e.g. a whole folder)."""
    parts = name.split("/")
    for end in range(1, len(parts) + 1):
        if not (directory / "/".join(parts[:end])).exists():
            return "/".join(parts[:end])
    return name


def manifest_problem(directory, fmt, required=(), checksums=False, unchecked=(), **fields):
    """What keeps `directory` from being a complete folder of format `fmt`, or None.

    Args:
        directory: the folder.
        fmt: the format its manifest must name.
        required: files (or folders) the manifest must list (files in).
        checksums: also compare the files' sha256 (reads them).
        unchecked: files (or folders) whose sha256 `checksums` leaves out (their size is checked).
        **fields: entries the manifest must hold with these values (e.g. `step=1000`).

    Returns:
        None, or one phrase naming the file and what is wrong with it.
    """
    directory = pathlib.Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        return f"it has no {MANIFEST_FILE} (an interrupted save, or an older format)"
    try:
        manifest = read_json(directory / MANIFEST_FILE)
    except CheckpointError as error:
        return str(error).rstrip(".")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST_FILE} lists no files"
    if manifest.get("format") != fmt:
        return f"{MANIFEST_FILE} is of format {manifest.get('format')!r}, expected {fmt!r}"
    for key, value in fields.items():
        if manifest.get(key) != value:
            return f"{MANIFEST_FILE} says {key} {manifest.get(key)!r}, expected {value!r}"
    files = manifest["files"]
    for name in required:
        if not any(_under(listed, (name,)) for listed in files):
            return f"{MANIFEST_FILE} does not list {name}"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{_missing(directory, name)} is missing"
        size = path.stat().st_size
        if size != entry.get("bytes"):
            return (
                f"{name} has {size} bytes, {MANIFEST_FILE} lists {entry.get('bytes')} (truncated?)"
            )
    if checksums:
        for name, entry in files.items():
            if not _under(name, unchecked) and _sha256(directory / name) != entry.get("sha256"):
                return f"{name} does not match its sha256 in {MANIFEST_FILE} (corrupt)"
    return None


def manifest_files(directory):
    """The file names a (complete) folder's manifest lists."""
    return set(read_json(pathlib.Path(directory) / MANIFEST_FILE)["files"])


def holds(step_dir, folder):
    """Whether a complete checkpoint's manifest lists files in `folder` (e.g. `OPTIMIZER_DIR`)."""
    return any(_under(name, (folder,)) for name in manifest_files(step_dir))


# === Checkpoints ===


def checkpoint_problem(step_dir, checksums=False, unchecked=()):
    """What keeps `step_dir` from being a complete checkpoint, or None.

    Args:
        step_dir: a `<step>` directory.
        checksums: also compare the files' sha256 and parse `state.json`
            (reads the files; the size check alone reads none).
        unchecked: files (or folders) whose sha256 `checksums` leaves out,
            e.g. the optimizer state when loading for inference.

    Returns:
        None, or one phrase naming the file and what is wrong with it, e.g.
        "arrays/optimizer is missing".
    """
    step_dir = pathlib.Path(step_dir)
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    fields = {} if step is None else {"step": step}
    problem = manifest_problem(step_dir, FORMAT, REQUIRED_FILES, checksums, unchecked, **fields)
    if problem is None and checksums:
        try:
            state = read_json(step_dir / STATE_FILE)
        except CheckpointError as error:
            return str(error).rstrip(".")
        if not isinstance(state, dict) or (step is not None and state.get("step") != step):
            return f"{STATE_FILE} is not of step {step}"
    return problem


def step_dirs(directory):
    """The steps of every `<step>` folder in `directory` (complete or not), ascending."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def checkpoint_steps(directory):
    """The steps of the complete checkpoints in `directory` (by size, not checksum), ascending."""
    directory = pathlib.Path(directory)
    return [s for s in step_dirs(directory) if checkpoint_problem(directory / str(s)) is None]


def read_state(step_dir):
    """The checkpoint's `state.json` dict (step, data position, config, ...)."""
    state = read_json(pathlib.Path(step_dir) / STATE_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{pathlib.Path(step_dir) / STATE_FILE} does not hold a dict.")
    return state


def is_step_dir(path):
    path = pathlib.Path(path)
    return (path / MANIFEST_FILE).is_file() or (path / STATE_FILE).is_file()


def find_step_dir(path):
    """The verified checkpoint `path` names: `path` itself, or the newest complete one in it.

    A run directory's newer incomplete or corrupt checkpoints are skipped
    with a warning that names them and why.

    Raises:
        CheckpointError: `path` is a step directory that is not complete, or
            a run directory with no complete checkpoint.
    """
    path = pathlib.Path(path)
    if is_step_dir(path):
        problem = checkpoint_problem(path, checksums=True, unchecked=INFERENCE_UNCHECKED)
        if problem:
            raise CheckpointError(f"checkpoint {path} is not complete: {problem}.")
        return path
    skipped = []
    for step in reversed(step_dirs(path)):
        step_dir = path / str(step)
        problem = checkpoint_problem(step_dir, checksums=True, unchecked=INFERENCE_UNCHECKED)
        if problem is None:
            if skipped:
                warnings.warn(
                    f"{path}: using checkpoint {step}; skipped {'; '.join(skipped)}.",
                    CheckpointFallbackWarning,
                    stacklevel=2,
                )
            return path / str(step)
        skipped.append(f"{step} ({problem})")
    detail = f": {'; '.join(skipped)}" if skipped else ""
    raise CheckpointError(f"no complete training checkpoint in {path}{detail}.")


def is_training_checkpoint(path):
    """Whether `path` is a step directory or a directory of step directories."""
    path = pathlib.Path(path)
    return path.is_dir() and (
        is_step_dir(path) or any(is_step_dir(path / str(s)) for s in step_dirs(path))
    )


def norm_stats_dirs(path):
    """Where a checkpoint's norm stats are: its step's `assets/` (openpi's layout)."""
    return [find_step_dir(path) / ASSETS_DIR]


# === Weights ===


def by_path(variables, what):
    """`{variable.path: variable}`; paths must be unique (they key the files)."""
    named = {v.path: v for v in variables}
    if len(named) != len(variables):
        raise ValueError(
            f"the {what} variables' paths are not unique, so they cannot be saved by path."
        )
    return named


def check_arrays(named, specs, source, what, subset=False):
    """Raises unless the stored arrays fit the variables: the same names, shapes and dtypes.

    Args:
        named: `{path: variable}`.
        specs: `{name: (shape, dtype name)}` of the stored arrays (`array_specs`).
        source: the arrays' folder, for the message.
        what: what the variables are ("model", "optimizer", "EMA").
        subset: the arrays may cover only some of the variables.

    Raises:
        CheckpointError: naming `source`, the variable and what differs.
    """
    missing = [] if subset else sorted(set(named) - set(specs))
    unexpected = sorted(set(specs) - set(named))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the {what}: {len(missing)} variables missing from the file "
            f"{missing[:3]}, {len(unexpected)} not in the {what} {unexpected[:3]} (a different "
            "model config or fine-tuning strategy?)."
        )
    for key, (shape, stored) in specs.items():
        variable = named[key]
        if tuple(shape) != tuple(variable.shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {tuple(shape)}, the {what}'s variable "
                f"{tuple(variable.shape)}."
            )
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if keras.backend.standardize_dtype(stored) != dtype:
            raise CheckpointError(
                f"{source}: {key!r} is stored as {stored}, the variable is {dtype}."
            )


def stored_specs(step_dir, folder):
    """`{name: (shape, dtype name)}` of the arrays in a checkpoint's `folder` (e.g. weights)."""
    path = pathlib.Path(step_dir) / folder
    try:
        return array_specs(path.parent, path.name)
    except ArraysError as error:
        raise CheckpointError(str(error)) from None


def _placement(variable, local):
    """Where a restored array goes: the variable's sharding (JAX), or None for numpy."""
    if local or keras.backend.backend() != "jax":
        return None
    return getattr(variable.value, "sharding", None)


def restore_variables(step_dir, groups, local=False):
    """Assigns a checkpoint's arrays to variables (read first, then all assigned).

    Args:
        step_dir: the checkpoint.
        groups: `[(folder, {name: variable})]`: the arrays of `folder` (e.g.
            `WEIGHTS_DIR`) to assign, already checked (`check_arrays`).
        local: this process reads alone, whole arrays (no other process takes
            part); otherwise every process reads the shards its variables hold.
    """
    step_dir = pathlib.Path(step_dir)
    requests = {}
    for folder, named in groups:
        requests[folder.split("/", 1)[1]] = {
            name: _placement(variable, local) for name, variable in named.items()
        }
    try:
        arrays = read_items(step_dir / ARRAYS_DIR, requests, local=local)
    except ArraysError as error:
        raise CheckpointError(str(error)) from None
    for folder, named in groups:
        values = arrays[folder.split("/", 1)[1]]
        for name, variable in named.items():
            variable.assign(values[name])


def _asset_layers(model):
    """The model's direct layers that keep files beside their weights (Keras' `save_assets`)."""
    return [layer for layer in model.layers if hasattr(layer, "save_assets")]


def save_model_assets(model, directory):
    """Writes each asset layer's files (`layer.save_assets`) to `directory/<layer name>/`.

    A layer that writes nothing (π0-FAST without a tokenizer) leaves no folder.
    """
    for layer in _asset_layers(model):
        folder = pathlib.Path(directory) / layer.name
        folder.mkdir(parents=True, exist_ok=True)
        layer.save_assets(str(folder))
        if not any(folder.iterdir()):
            folder.rmdir()
    if pathlib.Path(directory).is_dir() and not any(pathlib.Path(directory).iterdir()):
        pathlib.Path(directory).rmdir()


def load_model_assets(model, directory):
    """Reads the files `save_model_assets` wrote back into the model's layers (`load_assets`)."""
    for layer in _asset_layers(model):
        folder = pathlib.Path(directory) / layer.name
        if folder.is_dir():
            layer.load_assets(str(folder))


def load_model_spec(step_dir):
    """The model of a checkpoint's `model.json`, built, without its weights, with its assets."""
    path = pathlib.Path(step_dir) / MODEL_FILE
    spec = read_json(path)
    try:
        model = keras.saving.deserialize_keras_object(spec)
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"{path} does not describe a model this version builds: {error}"
        ) from None
    load_model_assets(model, pathlib.Path(step_dir) / MODEL_ASSETS_DIR)
    return model


def load_checkpoint_model(path, use_ema=True):
    """The model of a training checkpoint with its inference weights.

    Args:
        path: a step directory, or a run directory (its newest complete step).
        use_ema: use the EMA of the trainable weights when the checkpoint has
            one (openpi's inference `params`); False gives the raw weights.

    Returns:
        the model (not compiled).
    """
    step_dir = find_step_dir(path)
    model = load_model_spec(step_dir)
    named = by_path(model.variables, "model")
    weights = stored_specs(step_dir, WEIGHTS_DIR)
    check_arrays(named, weights, step_dir / WEIGHTS_DIR, "model")
    ema = {}
    if use_ema and holds(step_dir, EMA_DIR):
        ema = stored_specs(step_dir, EMA_DIR)
        check_arrays(named, ema, step_dir / EMA_DIR, "model", subset=True)
    raw = {name: v for name, v in named.items() if name not in ema}
    averaged = {name: named[name] for name in ema}
    groups = [(WEIGHTS_DIR, raw)] + ([(EMA_DIR, averaged)] if ema else [])
    restore_variables(step_dir, groups, local=True)
    return model
