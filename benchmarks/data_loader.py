"""Data loader throughput: samples/s of the LeRobot reader (MP4 decoding) and the procedural source.

A LeRobot v2.1 dataset is written first (the procedural reach task, three
cameras, LeRobot's default AV1 encoding, GOP 2, crf 30). Measured, in
shuffled order:

- `lerobot_reader`: `LeRobotDataset[i]` in one thread (parquet columns,
  a 50-step action chunk, three decoded video frames);
- `lerobot_loader`: `DataLoader` batches with π0's transforms (raw robot,
  normalization, resize to 224x224 with padding, prompt tokenization,
  padding to 32 dims), `--workers` threads;
- `procedural_loader`: the same transforms over `ProceduralDataset` (frames
  rendered with numpy).

Usage:
    python benchmarks/data_loader.py [--json PATH] [--episodes N] [--image-size S]
        [--batch-size B] [--batches N] [--workers W] [--codec libsvtav1]
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402

from keras_openpi.data.lerobot import LeRobotDataset  # noqa: E402
from keras_openpi.data.lerobot_writer import write_lerobot_dataset  # noqa: E402
from keras_openpi.data.loader import DataLoader  # noqa: E402
from keras_openpi.data.running_stats import compute_norm_stats  # noqa: E402
from keras_openpi.data.pipeline import build_transforms  # noqa: E402
from keras_openpi.data.pipeline import model_transforms  # noqa: E402
from keras_openpi.data.procedural_source import LEROBOT_REPACK  # noqa: E402
from keras_openpi.data.procedural_source import ProceduralDataset  # noqa: E402
from keras_openpi.data.robots import get_robot  # noqa: E402
from keras_openpi.data.transforms import Group  # noqa: E402
from keras_openpi.data.transforms import Repack  # noqa: E402
from keras_openpi.tokenizers import ByteTokenizer  # noqa: E402

ACTION_HORIZON = 50
ACTION_DIM = 32


class _PromptTokenizer:
    """`ByteTokenizer` with the `tokenize(prompt, state=None)` interface of `TokenizePrompt`."""

    def __init__(self, max_len=48):
        self.tokenizer = ByteTokenizer(max_len)

    def tokenize(self, prompt, state=None):
        return self.tokenizer.encode(prompt)


def _transforms(norm_stats, repack=None):
    model = model_transforms("pi0", tokenizer=_PromptTokenizer(), action_dim=ACTION_DIM)
    group = build_transforms(
        robot=get_robot("raw"),
        model=model,
        norm_stats=norm_stats,
        repack=Group([Repack(repack)]) if repack else Group(),
    )
    return group.inputs


def _time_reader(data, count, seed=0):
    order = np.random.default_rng(seed).permutation(len(data))[:count]
    data[int(order[0])]  # open files
    begin = time.perf_counter()
    for index in order:
        data[int(index)]
    return count / (time.perf_counter() - begin)


def _time_loader(loader, batches):
    iterator = iter(loader)
    next(iterator)  # start the workers
    begin = time.perf_counter()
    samples = sum(len(actions) for _, (_, actions) in zip(range(batches), iterator))
    return samples / (time.perf_counter() - begin)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--codec", default="libsvtav1")
    args = parser.parse_args(argv)

    source = ProceduralDataset(
        args.episodes, image_size=args.image_size, action_horizon=ACTION_HORIZON
    )
    norm_stats = compute_norm_stats(
        {"state": source[i]["state"], "actions": source[i]["actions"]} for i in range(len(source))
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        root = write_lerobot_dataset(
            pathlib.Path(tmp) / "reach", source.lerobot_episodes(), fps=10, video_codec=args.codec
        )
        results["lerobot_write_frames_per_s"] = len(source) / (time.perf_counter() - begin)
        data = LeRobotDataset(root, action_horizon=ACTION_HORIZON, prompt_from_task=True)
        results["lerobot_reader_samples_per_s"] = _time_reader(data, min(len(data), 200))
        loader = DataLoader(
            data,
            args.batch_size,
            transform=_transforms(norm_stats, LEROBOT_REPACK),
            workers=args.workers,
        )
        results["lerobot_loader_samples_per_s"] = _time_loader(loader, args.batches)
    loader = DataLoader(
        source, args.batch_size, transform=_transforms(norm_stats), workers=args.workers
    )
    results["procedural_loader_samples_per_s"] = _time_loader(loader, args.batches)

    report = {
        "config": {
            **{k: v for k, v in vars(args).items() if k != "json"},
            "frames": len(source),
            "cameras": 3,
            "action_horizon": ACTION_HORIZON,
            "model_image_size": 224,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "results": {k: round(v, 1) for k, v in results.items()},
    }
    for name, value in report["results"].items():
        print(f"{name:36s} {value:10.1f}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
