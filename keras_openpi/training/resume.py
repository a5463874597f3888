"""Resuming a run: the checkpoint to continue from, and the settings that must not change.

`choose_checkpoint` walks a run's step folders from the newest down and
takes the first one that is complete (manifest, sizes and sha256) and
resumable (optimizer state, data position, norm stats); newer ones it
passes over are reported with the reason. On several processes
`agree_on_checkpoint` has process 0 check the checksums and the others
take its choice. `check_resume_settings` refuses a
config that contradicts the checkpoint's in a setting that fixes the model,
its fine-tuning or its batches, naming both values.
"""

import dataclasses
import pathlib

from keras_openpi.backend.multiprocess import broadcast_int
from keras_openpi.backend.multiprocess import process_count
from keras_openpi.backend.multiprocess import process_index
from keras_openpi.checkpoint_format import OPTIMIZER_DIR
from keras_openpi.checkpoint_format import CheckpointError
from keras_openpi.checkpoint_format import checkpoint_problem
from keras_openpi.checkpoint_format import holds
from keras_openpi.checkpoint_format import read_state
from keras_openpi.checkpoint_format import step_dirs
from keras_openpi.training.config import upgrade_config_dict

# Settings a resumed run must share with its checkpoint (dotted prefixes): they fix the
# model and its fine-tuning, the batches, the noise and the transforms. The optimizer's
# schedule, the step count, retention, paths and the distribution may change.
FIXED_SETTINGS = (
    "model_type",
    "model",
    "strategy",
    "ema_decay",
    "seed",
    "batch_size",
    "augment",
    "discrete_state_input",
    "data.source",
    "data.robot",
    "data.repack",
    "data.action_keys",
    "data.delta_actions",
    "data.adapt_to_pi",
    "data.prompt_from_task",
    "data.default_prompt",
    "data.asset_id",
    "data.source_options",
)
# Settings whose change is expected (names, paths) and not worth a line.
_QUIET_SETTINGS = (
    "name",
    "description",
    "weights",
    "base_weights",
    "checkpoint_base_dir",
    "assets_dir",
    "exp_name",
    "data.path",
)


@dataclasses.dataclass
class ResumePoint:
    """The checkpoint a run continues from (or, `finished`, the one it ended at).

    Args:
        step: its step.
        step_dir: its folder.
        state: its `state.json` dict.
        skipped: `[(step, reason)]` of the newer folders passed over.
        finished: the step is at or past the run's end step.
    """

    step: int
    step_dir: pathlib.Path
    state: dict
    skipped: list
    finished: bool = False


def resumable_problem(step_dir, state):
    """What keeps a complete checkpoint from being continued exactly, or None."""
    if not holds(step_dir, OPTIMIZER_DIR):
        return (
            f"it holds no optimizer state ({OPTIMIZER_DIR}; resuming would restart the "
            "optimizer's warm-up)"
        )
    if not state.get("data"):
        return "its state.json holds no data position"
    if not state.get("asset_id"):
        return "it holds no norm stats"
    return None


def choose_checkpoint(directory, end_step, checksums=True, newest=None):
    """The checkpoint a `--resume` continues from.

    Args:
        directory: the run's checkpoint directory.
        end_step: the step the run trains to; a complete checkpoint at or past
            it is returned as `finished` (even if it could not be continued).
        checksums: compare the files' sha256 (False: their sizes only).
        newest: pass over the steps above this one (another process's choice).

    Returns:
        a `ResumePoint`, or None when `directory` has no step folder.

    Raises:
        CheckpointError: there are step folders but none can be resumed
            (each named with its reason).
    """
    directory = pathlib.Path(directory)
    steps = step_dirs(directory)
    if not steps:
        return None
    skipped = []
    for step in reversed(steps):
        step_dir = directory / str(step)
        if newest is not None and step > newest:
            skipped.append((step, "process 0 found it incomplete (see its log)"))
            continue
        problem = checkpoint_problem(step_dir, checksums=checksums)
        state = read_state(step_dir) if problem is None else None
        if problem is None and step >= end_step:
            return ResumePoint(step, step_dir, state, skipped, finished=True)
        if problem is None:
            problem = resumable_problem(step_dir, state)
        if problem is None:
            return ResumePoint(step, step_dir, state, skipped)
        skipped.append((step, problem))
    reasons = "; ".join(f"{step}: {problem}" for step, problem in skipped)
    raise CheckpointError(
        f"{directory} holds no checkpoint to resume ({reasons}): pass --overwrite to start over "
        "(it removes them) or choose another --checkpoint-dir."
    )


_NONE, _FAILED = -1, -2


def agree_on_checkpoint(directory, end_step):
    """`choose_checkpoint` on every process, with process 0's choice (it alone reads the sha256).

    On one process it is `choose_checkpoint`. On several, process 0 checks
    the checksums and the others take the step it chose, so that all
    continue from the same checkpoint without each reading all of it.
    """
    if process_count() == 1:
        return choose_checkpoint(directory, end_step)
    first = process_index() == 0
    try:
        point = choose_checkpoint(directory, end_step, checksums=first)
        error = None
    except CheckpointError as caught:
        point, error = None, caught
    mine = _FAILED if error is not None else _NONE if point is None else point.step
    chosen = broadcast_int(mine)
    if chosen == _FAILED:
        if error is not None:
            raise error
        raise CheckpointError(
            f"process 0 found no checkpoint to resume in {directory} (see its log)."
        )
    if chosen == mine:
        return point
    if chosen == _NONE:
        return None
    return choose_checkpoint(directory, end_step, checksums=False, newest=chosen)


# Settings compared as one value, not key by key.
_WHOLE_SETTINGS = ("strategy", "data.repack", "data.source_options")


def _flatten(data, prefix=""):
    """`{dotted key: value}` of a config dict (tuples as lists, as JSON stores them)."""
    if isinstance(data, dict) and data and prefix[:-1] not in _WHOLE_SETTINGS:
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: _plain(data)}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _fixed(key):
    return any(key == p or key.startswith(p + ".") for p in FIXED_SETTINGS)


def check_resume_settings(saved, config, step_dir):
    """Refuses a config that contradicts a checkpoint's; returns the allowed changes.

    Args:
        saved: the checkpoint's config (`state["config"]`, a dict), or None.
        config: the `TrainConfig` resuming it.
        step_dir: the checkpoint's folder (for the message).

    Returns:
        `[(key, config's value, checkpoint's value)]` of the settings that changed
        but may (the optimizer's, the step count, ...).

    Raises:
        ValueError: naming every contradicting setting with both values.
    """
    if not saved:
        return []
    mine, theirs = _flatten(config.to_dict()), _flatten(upgrade_config_dict(saved))
    conflicts, changes = [], []
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) == theirs.get(key):
            continue
        change = (key, mine.get(key), theirs.get(key))
        if _fixed(key):
            conflicts.append(change)
        elif key not in _QUIET_SETTINGS:
            changes.append(change)
    if conflicts:
        listed = "; ".join(f"{key} is {a!r}, the checkpoint's {b!r}" for key, a, b in conflicts)
        raise ValueError(
            f"--resume: the config contradicts checkpoint {step_dir}: {listed}. Resume with the "
            "checkpoint's settings, or start a new run (--overwrite or another --checkpoint-dir)."
        )
    return changes
