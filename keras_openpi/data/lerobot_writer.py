"""Saves episodes from any source as a LeRobot v2.1 dataset (parquet + MP4 via PyAV).

An episode is a dict of per-frame arrays with a leading time axis T and a
task: `{"observation.images.top": (T, H, W, 3) uint8, "observation.state":
(T, s), "action": (T, a), "task": str or T strings}`. (T, H, W, 3) uint8
arrays are cameras: MP4 videos by default (`dtype: video`), or PNG images
inside the parquet files with `use_videos=False` (`dtype: image`,
lossless). The result is what LeRobot's v2.1 writer produces:
`meta/info.json`, `meta/tasks.jsonl`, `meta/episodes.jsonl`,
`meta/episodes_stats.jsonl`, `meta/stats.json`,
`data/chunk-000/episode_000000.parquet` and
`videos/chunk-000/<key>/episode_000000.mp4`.
"""

import json
import os
import pathlib
import shutil

import numpy as np

from keras_openpi.data.finite import first_non_finite
from keras_openpi.data.finite import within_frame
from keras_openpi.data.lerobot_format import DEFAULT_CHUNK_SIZE
from keras_openpi.data.lerobot_format import INDEX_FEATURES
from keras_openpi.data.lerobot_format import V2_DATA_PATH
from keras_openpi.data.lerobot_format import V2_VIDEO_PATH
from keras_openpi.data.lerobot_format import aggregate_stats
from keras_openpi.data.video import DEFAULT_CODEC
from keras_openpi.data.video import encode_png
from keras_openpi.data.video import encode_video

VERSION = "v2.1"
# Rows per parquet row group when images are stored inline (the reader reads whole groups).
IMAGE_ROW_GROUP = 16
_INDEX_DTYPES = {"timestamp": "float32"} | {k: "int64" for k in INDEX_FEATURES[1:]}


def _is_camera(array):
    return array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3


def infer_features(episode, use_videos=True):
    """LeRobot `features` of an episode's arrays: cameras for (T, H, W, 3) uint8, else numeric.

    Example:
    >>> infer_features({"observation.state": np.zeros((5, 3), np.float32), "task": "x"})
    {'observation.state': {'dtype': 'float32', 'shape': [3], 'names': None}}
    """
    features = {}
    for key, value in episode.items():
        if key == "task" or key in INDEX_FEATURES:
            continue
        array = np.asarray(value)
        if array.ndim == 0:
            raise ValueError(f"episode key {key!r} must have a time axis, got a scalar.")
        if _is_camera(array):
            features[key] = {
                "dtype": "video" if use_videos else "image",
                "shape": list(array.shape[1:]),
                "names": ["height", "width", "channel"],
            }
        else:
            shape = list(array.shape[1:]) or [1]
            features[key] = {"dtype": str(array.dtype), "shape": shape, "names": None}
    return features


def _stats(array, camera):
    """LeRobot's per-episode stats of a feature (cameras: per channel in [0, 1], (3, 1, 1))."""
    if camera:
        values = array.reshape(-1, 3).astype(np.float64) / 255.0
        shape = (3, 1, 1)
    else:
        values = array.reshape(len(array), -1).astype(np.float64)
        shape = array.shape[1:] or (1,)
    return {
        "min": values.min(axis=0).reshape(shape),
        "max": values.max(axis=0).reshape(shape),
        "mean": values.mean(axis=0).reshape(shape),
        "std": values.std(axis=0).reshape(shape),
        "count": np.array([len(array)]),
    }


def _jsonable(stats):
    return {k: {n: np.asarray(v).tolist() for n, v in f.items()} for k, f in stats.items()}


def _arrow_column(array, dtype):
    """(T, ...) numpy → an arrow column as LeRobot stores it: scalars for shape [1], else lists."""
    import pyarrow as pa

    array = np.asarray(array, dtype=dtype)
    if array.ndim == 1 or array.shape[1:] == (1,):
        return pa.array(array.reshape(len(array)))
    column = pa.array(array.reshape(-1))
    for width in reversed(array.shape[1:]):
        offsets = np.arange(0, len(column) + 1, width, dtype=np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), column)
    return column


class LeRobotWriter:
    """Writes episodes one at a time as a LeRobot v2.1 dataset.

    Files go to `<root>.partial` and are moved to `root` by `finalize`, so an
    interrupted write never leaves a dataset that looks complete.

    Args:
        root: the dataset directory to create (must not exist unless `overwrite`).
        fps: frames per second.
        features: LeRobot `features` (`{key: {"dtype", "shape", "names"}}`);
            default: inferred from the first episode (`infer_features`).
        robot_type: recorded in `info.json`.
        use_videos: cameras as MP4 (True) or as PNG inside the parquet files.
        video_codec: PyAV encoder (`libsvtav1` as LeRobot, `h264`, ...).
        video_options: encoder options (default LeRobot's: GOP 2, crf 30).
        overwrite: replace an existing `root`.

    Example:
    >>> with LeRobotWriter("/tmp/reach", fps=10) as writer:  # doctest: +SKIP
    ...     writer.add_episode({"observation.state": states, "action": actions, "task": "reach"})
    """

    def __init__(
        self,
        root,
        *,
        fps,
        features=None,
        robot_type=None,
        use_videos=True,
        video_codec=DEFAULT_CODEC,
        video_options=None,
        overwrite=False,
    ):
        self.root = pathlib.Path(root)
        if self.root.exists() and not overwrite:
            raise FileExistsError(f"{self.root} exists; pass overwrite=True to replace it.")
        if int(fps) <= 0:
            raise ValueError(f"fps must be positive, got {fps}.")
        self.fps = int(fps)
        self.features = None if features is None else {k: dict(v) for k, v in features.items()}
        self.robot_type = robot_type
        self.use_videos = use_videos
        self.video_codec = video_codec
        self.video_options = video_options
        self._partial = self.root.with_name(self.root.name + ".partial")
        if self._partial.exists():
            shutil.rmtree(self._partial)
        (self._partial / "meta").mkdir(parents=True)
        self._tasks = {}  # task -> index
        self._episodes = []
        self._episode_stats = []
        self._frames = 0
        self._video_info = {}

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.finalize()
        else:
            shutil.rmtree(self._partial, ignore_errors=True)

    def _check(self, episode):
        keys = [k for k in episode if k != "task"]
        if "task" not in episode:
            raise ValueError(f"an episode needs a 'task' (str or one per frame); it has {keys}.")
        missing = [k for k in self.features if k not in episode]
        extra = [k for k in keys if k not in self.features and k not in INDEX_FEATURES]
        if missing or extra:
            raise ValueError(
                f"episode {len(self._episodes)} does not match the features: missing {missing}, "
                f"unexpected {extra}."
            )
        lengths = {k: len(episode[k]) for k in self.features}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"episode {len(self._episodes)}: keys differ in length: {lengths}.")
        length = next(iter(lengths.values()))
        if length == 0:
            raise ValueError(f"episode {len(self._episodes)} has no frames.")
        for key, feature in self.features.items():
            shape = tuple(np.shape(episode[key])[1:]) or (1,)
            if shape != tuple(feature["shape"]) and not (shape == () and feature["shape"] == [1]):
                raise ValueError(
                    f"episode {len(self._episodes)}: {key!r} has frames of shape {shape}, the "
                    f"feature says {tuple(feature['shape'])}."
                )
            bad = first_non_finite(episode[key])
            if bad is not None:
                raise ValueError(
                    f"episode {len(self._episodes)} frame {bad[0][0]}: {key!r} holds {bad[1]}"
                    f"{within_frame(bad[0][1:])}; a dataset must hold finite values."
                )
        return length

    def _task_indices(self, task, length):
        tasks = [task] * length if isinstance(task, str) else [str(t) for t in task]
        if len(tasks) != length:
            raise ValueError(f"'task' has {len(tasks)} entries for {length} frames.")
        for text in tasks:
            self._tasks.setdefault(text, len(self._tasks))
        return np.array([self._tasks[t] for t in tasks], np.int64), list(dict.fromkeys(tasks))

    def add_episode(self, episode):
        """Writes one episode (`{key: (T, ...) array, "task": ...}`); returns its index."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.features is None:
            self.features = infer_features(episode, self.use_videos)
        length = self._check(episode)
        index = len(self._episodes)
        chunk = index // DEFAULT_CHUNK_SIZE
        task_index, tasks = self._task_indices(episode["task"], length)
        frame_index = np.arange(length, dtype=np.int64)
        columns = {
            "timestamp": (frame_index / self.fps).astype(np.float32),
            "frame_index": frame_index,
            "episode_index": np.full(length, index, np.int64),
            "index": np.arange(self._frames, self._frames + length, dtype=np.int64),
            "task_index": task_index,
        }
        stats = {k: _stats(v, camera=False) for k, v in columns.items()}
        table, row_group = {}, None
        for key, feature in self.features.items():
            array = np.asarray(episode[key])
            camera = feature["dtype"] in ("video", "image")
            if camera and not _is_camera(array):
                raise ValueError(
                    f"{key!r} must be (T, H, W, 3) uint8 frames, got {array.dtype} {array.shape}."
                )
            stats[key] = _stats(array, camera)
            if feature["dtype"] == "video":
                path = V2_VIDEO_PATH.format(episode_chunk=chunk, video_key=key, episode_index=index)
                (self._partial / path).parent.mkdir(parents=True, exist_ok=True)
                info = encode_video(
                    array, self._partial / path, self.fps, self.video_codec, self.video_options
                )
                self._video_info.setdefault(key, info)
            elif feature["dtype"] == "image":
                images = [{"bytes": encode_png(image), "path": None} for image in array]
                table[key] = pa.array(
                    images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])
                )
                row_group = IMAGE_ROW_GROUP
            else:
                table[key] = _arrow_column(array, feature["dtype"])
        for key, values in columns.items():
            table[key] = pa.array(values)
        path = self._partial / V2_DATA_PATH.format(episode_chunk=chunk, episode_index=index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(table), path, row_group_size=row_group)
        self._episodes.append({"episode_index": index, "tasks": tasks, "length": length})
        self._episode_stats.append({"episode_index": index, "stats": stats})
        self._frames += length
        return index

    def _info(self):
        features = {}
        for key, feature in self.features.items():
            features[key] = dict(feature)
            if feature["dtype"] == "video":
                features[key]["info"] = self._video_info[key]
        for key in INDEX_FEATURES:
            features[key] = {"dtype": _INDEX_DTYPES[key], "shape": [1], "names": None}
        videos = [k for k, f in self.features.items() if f["dtype"] == "video"]
        episodes = len(self._episodes)
        return {
            "codebase_version": VERSION,
            "robot_type": self.robot_type,
            "total_episodes": episodes,
            "total_frames": self._frames,
            "total_tasks": len(self._tasks),
            "total_videos": episodes * len(videos),
            "total_chunks": -(-episodes // DEFAULT_CHUNK_SIZE),
            "chunks_size": DEFAULT_CHUNK_SIZE,
            "fps": self.fps,
            "splits": {"train": f"0:{episodes}"},
            "data_path": V2_DATA_PATH,
            "video_path": V2_VIDEO_PATH if videos else None,
            "features": features,
        }

    def finalize(self):
        """Writes `meta/` and moves the dataset into place; returns its root."""
        if not self._episodes:
            raise ValueError("no episodes were added; a LeRobot dataset needs at least one.")
        meta = self._partial / "meta"
        (meta / "info.json").write_text(json.dumps(self._info(), indent=4))
        lines = {
            "tasks.jsonl": [{"task_index": i, "task": t} for t, i in self._tasks.items()],
            "episodes.jsonl": self._episodes,
            "episodes_stats.jsonl": [
                {"episode_index": e["episode_index"], "stats": _jsonable(e["stats"])}
                for e in self._episode_stats
            ],
        }
        for name, items in lines.items():
            (meta / name).write_text("".join(json.dumps(item) + "\n" for item in items))
        merged = aggregate_stats([e["stats"] for e in self._episode_stats])
        (meta / "stats.json").write_text(json.dumps(_jsonable(merged), indent=4))
        if self.root.exists():
            shutil.rmtree(self.root)
        os.replace(self._partial, self.root)
        return self.root


def write_lerobot_dataset(root, episodes, *, fps, **options):
    """Saves an iterable of episodes as a LeRobot v2.1 dataset at `root`.

    Args:
        root: the directory to create.
        episodes: iterable of `{key: (T, ...) array, "task": str or T strings}`
            (e.g. `ProceduralDataset.lerobot_episodes()`, `LeRobotDataset.episode(i)`,
            `RldsDataset.lerobot_episodes()`, or `episodes_from_frames(frames)`).
        fps: frames per second.
        **options: `LeRobotWriter` options (`features`, `use_videos`, `video_codec`, ...).

    Returns:
        the dataset's root.
    """
    writer = LeRobotWriter(root, fps=fps, **options)
    with writer:
        for episode in episodes:
            writer.add_episode(episode)
    return writer.root


def episodes_from_frames(frames):
    """Groups an iterable of frame dicts into episodes by consecutive `episode_index`.

    Each frame holds `episode_index`, `task` and per-frame values; the
    episodes hold the values stacked on a time axis and the per-frame tasks.
    """
    current, episode_index = None, None
    for number, frame in enumerate(frames):
        if "episode_index" not in frame or "task" not in frame:
            raise ValueError(
                f"frame {number} needs 'episode_index' and 'task'; it has {sorted(frame)}."
            )
        if current is not None and frame["episode_index"] != episode_index:
            yield {k: (v if k == "task" else np.stack(v)) for k, v in current.items()}
            current = None
        if current is None:
            current, episode_index = {}, frame["episode_index"]
        for key, value in frame.items():
            if key not in INDEX_FEATURES:
                current.setdefault(key, []).append(value)
    if current is not None:
        yield {k: (v if k == "task" else np.stack(v)) for k, v in current.items()}
