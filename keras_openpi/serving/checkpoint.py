"""Loading a model to serve, and the norm stats that travel with it.

Each checkpoint format is one entry of `CHECKPOINT_FORMATS`: a `matches(path)`
test, a `load_model(path)` and the directories where its norm stats may be.
A new format is one more entry. Training checkpoints are read through
`keras_openpi.checkpoint_format`, the module both training and serving use.
"""

import dataclasses
import pathlib
from typing import Callable

import keras_openpi.models  # noqa: F401  registers the classes a .keras file names
from keras_openpi import checkpoint_format
from keras_openpi.convert.keras_file import load_keras_policy
from keras_openpi.data.normalize import FILE_NAME as NORM_STATS_FILE
from keras_openpi.data.normalize import load_norm_stats


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """One loadable checkpoint layout.

    Args:
        name: how messages call it.
        matches: `path -> bool`, whether `path` is in this format.
        load_model: `path -> model`, the policy model (`Pi0` or `Pi0Fast`).
        norm_stats_dirs: `path -> [directory]`, where to look (in order) for
            the `norm_stats.json` that travels with the checkpoint.
    """

    name: str
    matches: Callable
    load_model: Callable
    norm_stats_dirs: Callable


CHECKPOINT_FORMATS = (
    CheckpointFormat(
        name=".keras file",
        matches=lambda path: path.is_file() and path.suffix == ".keras",
        load_model=load_keras_policy,
        norm_stats_dirs=lambda path: [path.parent, path.parent / "assets"],
    ),
    CheckpointFormat(
        name="training checkpoint directory",
        matches=checkpoint_format.is_training_checkpoint,
        load_model=checkpoint_format.load_checkpoint_model,
        norm_stats_dirs=checkpoint_format.norm_stats_dirs,
    ),
)


def checkpoint_format(path):
    """The entry of `CHECKPOINT_FORMATS` that `path` is in.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: when it is in no known format.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}.")
    for candidate in CHECKPOINT_FORMATS:
        if candidate.matches(path):
            return candidate
    names = [f.name for f in CHECKPOINT_FORMATS]
    raise ValueError(f"{path} is not a checkpoint this version can load; expected one of {names}.")


def find_norm_stats(directories):
    """The first `norm_stats.json` in `directories`, or in exactly one subdirectory of them.

    openpi keeps a checkpoint's stats in `assets/<asset_id>/norm_stats.json`;
    several asset ids are ambiguous, so then the caller must name the file.
    """
    for directory in directories:
        directory = pathlib.Path(directory)
        if (directory / NORM_STATS_FILE).is_file():
            return directory / NORM_STATS_FILE
        nested = sorted(directory.glob(f"*/{NORM_STATS_FILE}")) if directory.is_dir() else []
        if len(nested) > 1:
            raise ValueError(
                f"several norm stats files under {directory}: {[str(p) for p in nested]}; "
                "choose one with --norm-stats."
            )
        if nested:
            return nested[0]
    return None


def resolve_norm_stats(norm_stats, directories):
    """The norm stats to serve with: explicit ones, else those found in `directories`.

    Args:
        norm_stats: a mapping `{key: NormStats}`, a `norm_stats.json` path (or
            its directory), or None to search `directories` (see `find_norm_stats`).
        directories: where the checkpoint's own stats may be.

    Returns:
        `({key: NormStats} or None, source)`; source says where they came from.
    """
    if norm_stats is None:
        norm_stats = find_norm_stats(directories)
        if norm_stats is None:
            return None, "none"
    if isinstance(norm_stats, (str, pathlib.Path)):
        return load_norm_stats(norm_stats), str(norm_stats)
    return dict(norm_stats), "given"
