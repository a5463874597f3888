"""The expert's recorded episodes (`scripted_expert.py`'s .npz files) → a LeRobot v2.1 dataset.

Runs with keras_openpi (`.venv`). The dataset has the layout of LeRobot's
`aloha_sim_transfer_cube_*` datasets, so openpi's ALOHA repacking reads it:
`observation.images.<camera>` (MP4), `observation.state` (14), `action` (14),
task "Transfer cube", 50 fps, robot type `aloha`.

    python make_dataset.py /tmp/demos outputs/aloha_sim/dataset
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from keras_openpi.data.lerobot_writer import write_lerobot_dataset

TASK = "Transfer cube"
SUCCESS_REWARD = 4


def read_episodes(demos_dir, only_successes=True):
    """The episodes of `demos_dir` as LeRobot episode dicts (failed ones skipped by default).

    Raises:
        FileNotFoundError: `demos_dir` has no `episode_*.npz`.
        ValueError: no episode is left.
    """
    paths = sorted(pathlib.Path(demos_dir).glob("episode_*.npz"))
    if not paths:
        raise FileNotFoundError(f"{demos_dir} has no episode_*.npz files.")
    kept = 0
    for path in paths:
        with np.load(path) as data:
            if only_successes and data["reward"].max() < SUCCESS_REWARD:
                continue
            episode = {
                f"observation.{key}": data[key]
                for key in data.files
                if key.startswith("images.")
            }
            episode["observation.state"] = data["state"].astype(np.float32)
            episode["action"] = data["action"].astype(np.float32)
            episode["task"] = TASK
        kept += 1
        yield episode
    if kept == 0:
        raise ValueError(f"none of the {len(paths)} episodes in {demos_dir} is a success.")


def make_dataset(demos_dir, output, *, only_successes=True, overwrite=False):
    """Writes the dataset; returns `(root, number of episodes, number of frames)`."""
    summary = json.loads((pathlib.Path(demos_dir) / "summary.json").read_text())
    root = write_lerobot_dataset(
        output,
        read_episodes(demos_dir, only_successes),
        fps=summary["fps"],
        robot_type="aloha",
        overwrite=overwrite,
    )
    info = json.loads((pathlib.Path(root) / "meta" / "info.json").read_text())
    return root, info["total_episodes"], info["total_frames"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demos", help="scripted_expert.py's output directory")
    parser.add_argument("output", help="the dataset directory to create")
    parser.add_argument(
        "--keep-failures", action="store_true", help="keep episodes that did not succeed"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = parser.parse_args(argv)
    root, episodes, frames = make_dataset(
        args.demos, args.output, only_successes=not args.keep_failures, overwrite=args.overwrite
    )
    print(f"wrote {root}: {episodes} episodes, {frames} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
