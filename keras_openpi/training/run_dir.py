"""What a training run writes in its directory, so that `--overwrite` removes that and nothing else.

    <checkpoint_dir>/
      <step>/                  checkpoints (`keras_openpi.checkpoint_format`)
      <step>.skipped/          checkpoints a resume could not use, moved aside (never deleted)
      .partial-* .replaced-* .deleting-*   saves, replacements and deletions in progress
      metrics.csv  metrics_superseded.csv  train_config.json
      tensorboard/events.out.tfevents.*
      export/policy.keras  export/norm_stats.json  export/manifest.json

Anything else in the directory (a user's file, a folder of data, a step
folder holding a file no checkpoint has) is unknown, and `--overwrite`
refuses the directory, naming it.
"""

import pathlib
import re
import shutil
import uuid

from keras_openpi.checkpoint_arrays import ARRAYS_DIR
from keras_openpi.checkpoint_format import ASSETS_DIR
from keras_openpi.checkpoint_format import MANIFEST_FILE
from keras_openpi.checkpoint_format import MODEL_FILE
from keras_openpi.checkpoint_format import STATE_FILE

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.csv"
SUPERSEDED_METRICS_FILE = "metrics_superseded.csv"
TENSORBOARD_DIR = "tensorboard"
EXPORT_DIR = "export"
EXPORT_MODEL = "policy.keras"
NORM_STATS_FILE = "norm_stats.json"

_CHECKPOINT_FILES = {MANIFEST_FILE, MODEL_FILE, STATE_FILE}
_EXPORT_FILES = {EXPORT_MODEL, NORM_STATS_FILE, MANIFEST_FILE}
_RUN_FILES = {
    CONFIG_FILE,
    METRICS_FILE,
    SUPERSEDED_METRICS_FILE,
    f"{CONFIG_FILE}.partial",
    f"{METRICS_FILE}.partial",
}
_STEP = re.compile(r"\d+")
_SKIPPED = re.compile(r"\d+\.skipped(-\d+)?")
_HIDDEN = re.compile(r"\.(partial|replaced|deleting)-[\w.-]+")
_EVENTS = re.compile(r"events\.out\.tfevents\..+")


def _only(directory, allowed):
    """Whether every entry of `directory` (a tree) is allowed by `allowed(relative path)`."""
    return all(allowed(p.relative_to(directory)) for p in directory.rglob("*"))


def _is_checkpoint_tree(path):
    def allowed(relative):
        parts = relative.parts
        if parts[0] == ASSETS_DIR:  # assets/<asset_id>/norm_stats.json
            return len(parts) < 3 or (len(parts) == 3 and parts[2].startswith(NORM_STATS_FILE))
        if parts[0] == ARRAYS_DIR:  # orbax's files
            return True
        return len(parts) == 1 and parts[0] in _CHECKPOINT_FILES

    return path.is_dir() and _only(path, allowed)


def is_export_dir(path):
    """Whether `path` is a folder holding only an export's files."""

    def allowed(relative):
        name = relative.name
        return len(relative.parts) == 1 and (
            name in _EXPORT_FILES or name.startswith((".partial-", f"{NORM_STATS_FILE}."))
        )

    return path.is_dir() and _only(path, allowed)


def is_run_entry(path):
    """Whether `path`, an entry of a run directory, is one a training run writes."""
    path = pathlib.Path(path)
    name = path.name
    if _STEP.fullmatch(name) or _SKIPPED.fullmatch(name):
        return _is_checkpoint_tree(path)
    if _HIDDEN.fullmatch(name):
        return path.is_dir() or path.is_file()
    if name == TENSORBOARD_DIR:
        return path.is_dir() and _only(
            path, lambda relative: (path / relative).is_dir() or _EVENTS.fullmatch(relative.name)
        )
    if name == EXPORT_DIR:
        return is_export_dir(path)
    return name in _RUN_FILES and path.is_file()


def run_entries(directory):
    """`(ours, unknown)`: the sorted entry names of `directory` a run wrote, and the others."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return [], []
    ours, unknown = [], []
    for path in sorted(directory.iterdir()):
        (ours if is_run_entry(path) else unknown).append(path.name)
    return ours, unknown


def check_overwritable(directory):
    """The entries `--overwrite` will remove from `directory`.

    Raises:
        ValueError: `directory` is a file, or holds entries no run writes
            (named, with what to do); nothing is removed.
    """
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--checkpoint-dir {directory} is a file, not a directory.")
    ours, unknown = run_entries(directory)
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise ValueError(
            f"--overwrite removes only what keras-openpi train writes, and {directory} also holds "
            f"{shown}: move them away or choose another --checkpoint-dir."
        )
    return ours


def remove_run_entries(directory, names):
    """Removes the run's entries `names` from `directory` (each renamed away, then deleted)."""
    directory = pathlib.Path(directory)
    for name in names:
        path = directory / name
        if not path.exists():
            continue
        doomed = directory / f".deleting-{uuid.uuid4().hex[:8]}"
        path.rename(doomed)
        if doomed.is_dir():
            shutil.rmtree(doomed)
        else:
            doomed.unlink()


def move_aside(step_dir):
    """Renames a checkpoint a resume skips to `<step>.skipped` (`.skipped-N`); returns the path."""
    step_dir = pathlib.Path(step_dir)
    target = step_dir.with_name(f"{step_dir.name}.skipped")
    number = 1
    while target.exists():
        number += 1
        target = step_dir.with_name(f"{step_dir.name}.skipped-{number}")
    step_dir.rename(target)
    return target
