"""A training config's data: the source, openpi's transform chain, the norm stats, the loader.

openpi's order: repack (dataset keys → robot keys) → robot inputs (and
delta actions) → `Normalize` → model inputs (default prompt, resize,
tokenize, pad). Norm stats are computed, as openpi's `compute_norm_stats`
does, on the samples after the repack and robot transforms (unpadded,
actions as full chunks), and stored in `<assets_dir>/<config>/<asset_id>/`.
"""

import math
import pathlib
import sys
import warnings

import numpy as np

from keras_openpi.backend.multiprocess import broadcast_int
from keras_openpi.backend.multiprocess import process_index
from keras_openpi.data import pipeline
from keras_openpi.data.loader import DataLoader
from keras_openpi.data.running_stats import compute_norm_stats
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.data.normalize import save_norm_stats
from keras_openpi.data.robots import aloha
from keras_openpi.data.robots import droid
from keras_openpi.data.robots import get_robot
from keras_openpi.data.robots import libero
from keras_openpi.data.sources import make_source
from keras_openpi.data.transforms import Group
from keras_openpi.data.transforms import Repack
from keras_openpi.data.transforms import compose

# How each robot's LeRobot datasets name their features (openpi's repack transforms);
# `raw` is the layout `LeRobotWriter` gives the procedural task.
LEROBOT_REPACK = {
    "aloha": aloha.LEROBOT_REPACK,
    "droid": droid.LEROBOT_REPACK,
    "libero": libero.LEROBOT_REPACK,
}
NORM_STATS_KEYS = ("state", "actions")
_PATH_SOURCES = ("lerobot", "rlds")


def _raw_repack():
    from keras_openpi.data.procedural_source import LEROBOT_REPACK as raw

    return raw


def open_source(config, action_horizon):
    """The data source of `config.data` with action chunks of `action_horizon` steps.

    Raises:
        ValueError: no `data.path` for a dataset source.
        FileNotFoundError: `data.path` does not exist.
    """
    data = config.data
    options = dict(data.source_options)
    if data.source in _PATH_SOURCES:
        if not data.path:
            raise ValueError(
                f"config {config.name!r} trains on a {data.source} dataset: give its directory "
                "with --set data.path=DIR."
            )
        if not pathlib.Path(data.path).exists():
            raise FileNotFoundError(f"data.path {data.path} does not exist.")
    if data.source == "lerobot":
        return make_source(
            "lerobot",
            path=data.path,
            action_horizon=action_horizon,
            action_keys=tuple(data.action_keys),
            prompt_from_task=data.prompt_from_task,
            **options,
        )
    if data.source == "rlds":
        options.setdefault("chunk_keys", ("actions",))
        return make_source("rlds", path=data.path, action_horizon=action_horizon, **options)
    if data.source == "procedural":
        return make_source("procedural", action_horizon=action_horizon, **options)
    raise ValueError(f"data.source must be one of lerobot, rlds, procedural; got {data.source!r}.")


def robot_transforms(config):
    """The repack and robot transforms (`Group`), before normalization."""
    data = config.data
    repack = data.repack
    if repack is None and data.source == "lerobot":
        repack = LEROBOT_REPACK.get(data.robot) or _raw_repack()
    robot = get_robot(
        data.robot,
        model_type=config.model_type,
        delta_actions=data.delta_actions,
        adapt_to_pi=data.adapt_to_pi,
    )
    inputs = ([Repack(repack)] if repack else []) + list(robot.inputs)
    return Group(inputs, robot.outputs)


def asset_id(config):
    """The norm stats' asset id: `data.asset_id`, else the dataset directory's name."""
    data = config.data
    if data.asset_id:
        return data.asset_id
    if data.path:
        return pathlib.Path(data.path).name
    return data.source


def norm_stats_path(config):
    """Where openpi keeps a config's stats: `<assets_dir>/<name>/<asset_id>/norm_stats.json`."""
    return config.assets_dirs / asset_id(config) / "norm_stats.json"


def compute_config_norm_stats(config, source, transforms, log=print):
    """Norm stats of `state` and `actions` after the repack and robot transforms (openpi's way).

    Args:
        config: the `TrainConfig` (`data.norm_stats_max_frames` limits the frames).
        source: the data source.
        transforms: the repack and robot transforms (a list).
        log: where progress lines go.
    """
    max_frames = config.data.norm_stats_max_frames
    size = len(source) if hasattr(source, "__len__") else None
    batch_size = max(1, min(32, size or 32, max_frames or 32))
    loader = DataLoader(
        source,
        batch_size,
        transform=transforms,
        shuffle=max_frames is not None,
        seed=config.seed,
        num_epochs=1,
        model_inputs=False,
        workers=config.num_workers,
    )
    max_batches = None if max_frames is None else math.ceil(max_frames / batch_size)
    log(
        f"computing norm stats of {size or 'all'} frames"
        + (f" (at most {max_frames})" if max_frames else "")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = compute_norm_stats(iter(loader), keys=NORM_STATS_KEYS, max_samples=max_batches)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return stats


def check_sample(sample):
    """Raises a one-line ValueError unless the sample has `state` and `actions` vectors."""
    for key in NORM_STATS_KEYS:
        if key not in sample:
            raise ValueError(
                f"the data has no {key!r} after the repack and robot transforms (it has "
                f"{sorted(sample)}): check data.repack and data.robot."
            )
        if np.ndim(sample[key]) < 1:
            raise ValueError(f"the data's {key!r} is a scalar; expected a vector per frame.")


def check_norm_stats(norm_stats, sample, origin):
    """Raises a one-line ValueError unless the stats are this data's keys and dims.

    (`NormStats` itself refuses non-finite values, naming the file and key.)

    Args:
        norm_stats: `{key: NormStats}`.
        sample: a sample after the repack and robot transforms (`check_sample` passed).
        origin: where the stats came from (for the message).
    """
    for key in NORM_STATS_KEYS:
        if key not in norm_stats:
            raise ValueError(
                f"the norm stats from {origin} have no {key!r} (they have {sorted(norm_stats)}): "
                "they are not this data's; recompute them (delete the file or set data.norm_stats)."
            )
        width = np.shape(sample[key])[-1]
        stats = norm_stats[key]
        if stats.dim != width:
            raise ValueError(
                f"the norm stats from {origin} have {stats.dim} dims for {key!r} but the data's "
                f"{key!r} has {width}: recompute them (delete the file or set data.norm_stats)."
            )


def resolve_norm_stats(config, source, transforms, sample, log=print):
    """The config's norm stats: `data.norm_stats`, else the assets' file, else computed and saved.

    On several processes all take process 0's view of whether the file
    exists; computed stats are written by process 0 alone.

    Returns:
        `({key: NormStats}, origin)`.
    """
    path = norm_stats_path(config)
    if config.data.norm_stats:
        origin = config.data.norm_stats
        stats = load_norm_stats(origin)
    elif broadcast_int(path.is_file()):
        origin = str(path)
        stats = load_norm_stats(origin)
    else:
        stats = compute_config_norm_stats(config, source, transforms, log)
        origin = str(path)
        if process_index() == 0:
            save_norm_stats(path, stats)
            log(f"wrote {origin}")
    check_norm_stats(stats, sample, origin)
    return stats, origin


def check_actions(config, sample, settings):
    """Raises a one-line ValueError unless the data's action chunks fit the model.

    π0 / π0.5 zero-pad actions up to `action_dim`; π0-FAST tokenizes them as
    they are and decodes (H, action_dim) chunks, so its widths must be equal.

    Args:
        config: the `TrainConfig`.
        sample: a sample after the repack and robot transforms.
        settings: the model's settings (`action_dim`).
    """
    width, action_dim = np.shape(sample["actions"])[-1], settings["action_dim"]
    if config.model_type == "pi0_fast" and width != action_dim:
        raise ValueError(
            f"the data's actions have {width} dims but π0-FAST decodes chunks of its action_dim "
            f"{action_dim}: --set model.action_dim={width}."
        )
    if width > action_dim:
        raise ValueError(
            f"the data's actions have {width} dims, more than the model's action_dim {action_dim}."
        )


def model_transforms(config, settings, tokenizer, norm_stats, robot):
    """The whole input chain for training: robot → `Normalize` → model transforms (a list).

    Args:
        config: the `TrainConfig` (its `model_type`, prompt and state options).
        settings: the model's settings (`action_dim`, `action_horizon`, `image_resolution`).
        tokenizer: the run's tokenizer (π0-FAST: its `FASTPromptTokenizer`).
        norm_stats: `{key: NormStats}`.
        robot: the repack and robot transforms (`robot_transforms`).
    """
    fast = config.model_type == "pi0_fast"
    model_group = pipeline.model_transforms(
        config.model_type,
        tokenizer=tokenizer,
        action_dim=settings["action_dim"],
        image_size=tuple(settings["image_resolution"]),
        default_prompt=config.data.default_prompt,
        discrete_state_input=config.discrete_state_input,
        action_horizon=settings["action_horizon"] if fast else None,
    )
    chain = pipeline.build_transforms(
        robot=robot,
        model=model_group,
        norm_stats=norm_stats,
        use_quantiles=pipeline.uses_quantile_norm(config.model_type),
    )
    return list(chain.inputs)


def first_sample(source, transforms):
    """Sample 0 of the source (or its stream) after `transforms`."""
    if hasattr(source, "__getitem__") and getattr(source, "random_access", True):
        sample = source[0]
    else:
        sample = next(iter(source.iterate(shuffle=False, seed=0)))
    return compose(transforms)(sample)
