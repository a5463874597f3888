"""The registry of data sources: which reader opens which dataset.

Training configs name a source kind and its options:

    make_source("lerobot", path="/data/aloha_sim", action_horizon=50, prompt_from_task=True)
    make_source("rlds", path="/data/droid/1.0.1", keys={...}, prompt="language_instruction",
                action_horizon=16)
    make_source("procedural", num_episodes=64, image_size=96, action_horizon=10)

`detect_source_kind(path)` tells a LeRobot dataset (`meta/info.json`), a
TFDS / RLDS builder directory (`dataset_info.json`) and a `.npz` file apart.
"""

import difflib
import pathlib

import numpy as np

SOURCE_KINDS = ("lerobot", "rlds", "procedural", "npz")


def detect_source_kind(path):
    """`lerobot`, `rlds` or `npz` for a dataset at `path`; a clear error otherwise."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data source at {path}.")
    if path.is_file() and path.suffix == ".npz":
        return "npz"
    if (path / "meta" / "info.json").is_file():
        return "lerobot"
    if (path / "dataset_info.json").is_file() or any(path.glob("*/dataset_info.json")):
        return "rlds"
    if any(path.glob("*/*/dataset_info.json")):
        return "rlds"
    raise ValueError(
        f"unsupported data source {path}: expected a LeRobot dataset "
        "(meta/info.json), a TFDS/RLDS builder directory (dataset_info.json) or a .npz file."
    )


def make_source(kind, **options):
    """Opens a data source of `kind` (one of `SOURCE_KINDS`) with the reader's options.

    Returns:
        `LeRobotDataset(path, ...)`, `RldsDataset(path, keys, ...)`,
        `ProceduralDataset(...)` or `NpzSamples(path, keys, ...)`.

    Example:
    >>> len(make_source("procedural", num_episodes=2, image_size=32))
    35
    """
    if kind in ("lerobot", "rlds", "npz") and "path" not in options:
        raise ValueError(f"a {kind!r} source needs a 'path'; got options {sorted(options)}.")
    if kind == "lerobot":
        from keras_openpi.data.lerobot import LeRobotDataset

        return LeRobotDataset(options.pop("path"), **options)
    if kind == "rlds":
        from keras_openpi.data.rlds import RldsDataset

        return RldsDataset(options.pop("path"), **options)
    if kind == "procedural":
        from keras_openpi.data.procedural_source import ProceduralDataset

        return ProceduralDataset(**options)
    if kind == "npz":
        from keras_openpi.data.npz_source import NpzSamples

        return NpzSamples(options.pop("path"), **options)
    close = difflib.get_close_matches(str(kind), SOURCE_KINDS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown data source {kind!r}; choose one of {SOURCE_KINDS}.{hint}")


def iterate_samples(source, shuffle=False, seed=0):
    """One pass over any source's samples (random-access sources in a seeded permutation)."""
    if (
        hasattr(source, "__len__")
        and hasattr(source, "__getitem__")
        and getattr(source, "random_access", True)
    ):
        order = np.arange(len(source))
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(source))
        return (source[int(i)] for i in order)
    if hasattr(source, "iterate"):
        return source.iterate(shuffle=shuffle, seed=seed)
    return iter(source)
