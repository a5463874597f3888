"""The expert's recorded episodes (`scripted_expert.py`'s .npz files) → a LeRobot v2.1 dataset.

Runs with keras_openpi (`.venv`). Features, as LeRobot's MetaWorld data names them:
`observation.image` (the camera, PNG frames inside the parquet files: lossless, the policy's
camera is 64 px), `observation.state` (4: hand xyz, gripper opening),
`observation.environment_state` (MetaWorld's 39 numbers, for the record), `action` (4); the
task of each episode is its instruction (`tasks.PROMPTS`), 80 fps, robot type `sawyer`.

    python make_dataset.py /tmp/demos outputs/metaworld/dataset --tasks drawer-open-v3 door-open-v3
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from keras_openpi.data.lerobot_writer import write_lerobot_dataset

ROBOT_TYPE = "sawyer"


def demo_files(demos_dir, tasks=None):
    """The `.npz` files of `demos_dir` (of `tasks` only, in their order, when given).

    Raises:
        FileNotFoundError: no file (of one of `tasks`).
    """
    demos_dir = pathlib.Path(demos_dir)
    if tasks is None:
        paths = sorted(demos_dir.glob("*.npz"))
        if not paths:
            raise FileNotFoundError(f"{demos_dir} has no .npz demonstrations.")
        return paths
    paths = []
    for task in tasks:
        found = sorted(demos_dir.glob(f"{task}_*.npz"))
        if not found:
            raise FileNotFoundError(f"{demos_dir} has no demonstrations of {task} ({task}_*.npz).")
        paths += found
    return paths


def read_episodes(paths, max_per_task=None):
    """The episodes of `paths` as LeRobot episode dicts (at most `max_per_task` of each task)."""
    counts = {}
    for path in paths:
        with np.load(path) as data:
            task = str(data["task"])
            counts[task] = counts.get(task, 0) + 1
            if max_per_task is not None and counts[task] > max_per_task:
                continue
            yield {
                "observation.image": data["image"],
                "observation.state": data["state"].astype(np.float32),
                "observation.environment_state": data["environment_state"].astype(np.float32),
                "action": data["action"].astype(np.float32),
                "task": str(data["prompt"]),
            }


def make_dataset(demos_dir, output, *, tasks=None, max_per_task=None, overwrite=False):
    """Writes the dataset; returns `(root, number of episodes, number of frames)`."""
    summary = json.loads((pathlib.Path(demos_dir) / "summary.json").read_text())
    root = write_lerobot_dataset(
        output,
        read_episodes(demo_files(demos_dir, tasks), max_per_task),
        fps=summary["fps"],
        robot_type=ROBOT_TYPE,
        use_videos=False,
        overwrite=overwrite,
    )
    info = json.loads((pathlib.Path(root) / "meta" / "info.json").read_text())
    return root, info["total_episodes"], info["total_frames"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demos", help="scripted_expert.py's output directory")
    parser.add_argument("output", help="the dataset directory to create")
    parser.add_argument("--tasks", nargs="+", help="only these tasks (default all)")
    parser.add_argument("--max-per-task", type=int, help="at most this many episodes a task")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = parser.parse_args(argv)
    root, episodes, frames = make_dataset(
        args.demos, args.output, tasks=args.tasks, max_per_task=args.max_per_task,
        overwrite=args.overwrite,
    )
    print(f"wrote {root}: {episodes} episodes, {frames} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
