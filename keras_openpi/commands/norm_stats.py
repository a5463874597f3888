"""`keras-openpi norm-stats SOURCE --output PATH`: openpi's `norm_stats.json` of a dataset."""

import pathlib
import sys
import warnings

import numpy as np


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "norm-stats",
        help="compute normalization statistics (openpi's norm_stats.json) of a dataset",
        description=(
            "Computes mean, std, q01 and q99 of each key over every sample (action chunks "
            "count every step) and writes openpi's norm_stats.json."
        ),
    )
    parser.add_argument(
        "source",
        help="the data: a LeRobot dataset directory (v2.x / v3), a TFDS/RLDS builder "
        "directory, or a .npz file whose arrays have one row per sample",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="a .json file, or a directory that gets norm_stats.json",
    )
    parser.add_argument(
        "--keys",
        nargs="+",
        default=["state", "actions"],
        metavar="KEY[=NAME]",
        help="keys to describe, optionally taken from another array name: a LeRobot feature "
        "(state=observation.state actions=action) or RLDS step features joined by '+' "
        "(actions=action_dict/joint_position+action_dict/gripper_position); default: state actions",
    )
    parser.add_argument(
        "--action-horizon",
        type=int,
        default=None,
        help="describe 'actions' as chunks of this many future steps, the last one repeated at "
        "episode ends (openpi's stats cover the training chunks); default: one step per frame",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=None,
        help="use a random subset of this many samples (as openpi's --max-frames)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-frames subset")
    parser.add_argument(
        "--quantiles",
        choices=("exact", "openpi"),
        default="exact",
        help="how q01/q99 are computed: 'exact' (default; within 1/5000 of the data's range of "
        "np.quantile) or 'openpi' (openpi's RunningStats histogram, reproduced number for "
        "number: mean and std too, from float32 batches of --batch-size samples in order, the "
        "samples past the last full batch left out as openpi's loader does)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="with --quantiles openpi: the batch_size of the openpi config whose stats are "
        "reproduced (default 32, openpi's TrainConfig default)",
    )
    return parser


def parse_keys(specs):
    """`["state=observation.state", "actions"]` → `{"state": "observation.state", "actions": ...}`."""
    keys = {}
    for spec in specs:
        key, _, name = spec.partition("=")
        if not key or (_ and not name):
            raise ValueError(f"--keys entries are KEY or KEY=NAME, got {spec!r}.")
        keys[key] = name or key
    return keys


def open_source(source, keys, shuffle=False, seed=0, action_horizon=None):
    """The samples of `source`: an iterable of dicts holding `keys` (arrays (..., d)).

    Args:
        source: a `.npz` file, a LeRobot dataset directory or a TFDS/RLDS builder directory.
        keys: `{sample key: array / feature name}` (RLDS: step paths joined by '+').
        shuffle: a seeded random order (for a `--max-frames` subset).
        seed: seed of the order.
        action_horizon: make `actions` chunks of this many steps (LeRobot, RLDS).
    """
    from keras_openpi.data.sources import detect_source_kind
    from keras_openpi.data.sources import iterate_samples
    from keras_openpi.data.sources import make_source

    path = pathlib.Path(source)
    kind = detect_source_kind(path)
    if kind == "npz":
        if action_horizon is not None:
            raise ValueError("--action-horizon needs a LeRobot or RLDS dataset, not a .npz file.")
        return make_source("npz", path=path, keys=keys, shuffle=shuffle, seed=seed)
    if action_horizon is not None and "actions" not in keys:
        raise ValueError(f"--action-horizon chunks 'actions', but the keys are {sorted(keys)}.")
    chunked = ("actions",) if action_horizon is not None else ()
    if kind == "lerobot":
        data = make_source(
            "lerobot",
            path=path,
            keys=list(dict.fromkeys(keys.values())),
            action_horizon=action_horizon if chunked else None,
            action_keys=[keys[k] for k in chunked],
        )
        chunk_names = {keys[k] for k in chunked}
        plain = [k for k in keys if k not in chunked and keys[k] in chunk_names]
        if plain:
            raise ValueError(
                f"{plain[0]!r} and 'actions' read the same feature {keys[plain[0]]!r}, which "
                "--action-horizon makes a chunk."
            )
    else:
        data = make_source(
            "rlds",
            path=path,
            keys={k: name.split("+") for k, name in keys.items()},
            action_horizon=action_horizon if chunked else None,
            chunk_keys=chunked,
        )
    samples = iterate_samples(data, shuffle=shuffle, seed=seed)
    if kind == "rlds":
        return samples
    return ({key: sample[name] for key, name in keys.items()} for sample in samples)


def run(args):
    from keras_openpi.data.running_stats import compute_norm_stats
    from keras_openpi.data.normalize import save_norm_stats

    from keras_openpi.data.running_stats import OPENPI_BATCH_SIZE

    if args.max_frames is not None and args.max_frames < 2:
        raise ValueError(f"--max-frames must be at least 2, got {args.max_frames}.")
    if args.batch_size is not None and args.quantiles != "openpi":
        raise ValueError("--batch-size sets openpi's batches: it needs --quantiles openpi.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    batch_size = OPENPI_BATCH_SIZE if args.batch_size is None else args.batch_size
    keys = parse_keys(args.keys)
    samples = open_source(
        args.source,
        keys,
        shuffle=args.max_frames is not None,
        seed=args.seed,
        action_horizon=args.action_horizon,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = compute_norm_stats(
            samples,
            keys=tuple(keys),
            max_samples=args.max_frames,
            quantiles=args.quantiles,
            batch_size=batch_size,
        )
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    path = save_norm_stats(args.output, stats)
    with np.printoptions(precision=4, suppress=True, linewidth=100):
        for key, value in stats.items():
            print(f"{key} ({value.dim} dims)")
            for field in ("mean", "std", "q01", "q99"):
                print(f"  {field}: {getattr(value, field)}")
    print(f"wrote {path}")
    return 0
