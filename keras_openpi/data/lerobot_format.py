"""LeRobot's on-disk dataset formats (v2.0, v2.1 and v3.0): paths and metadata.

v2.x (one file per episode):

    meta/info.json            fps, features, path templates, counts
    meta/tasks.jsonl          {"task_index": 0, "task": "pick up the cube"} per line
    meta/episodes.jsonl       {"episode_index": 0, "tasks": [...], "length": 400} per line
    meta/episodes_stats.jsonl per-episode stats (v2.1); meta/stats.json (v2.0, often v2.1 too)
    data/chunk-000/episode_000000.parquet
    videos/chunk-000/<video_key>/episode_000000.mp4

v3.0 (many episodes per file):

    meta/info.json, meta/stats.json
    meta/tasks.parquet        column task_index, index (column) "task"
    meta/episodes/chunk-000/file-000.parquet   one row per episode: length, tasks,
        dataset_from_index / dataset_to_index, data/{chunk,file}_index,
        videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}
    data/chunk-000/file-000.parquet
    videos/<video_key>/chunk-000/file-000.mp4  episodes concatenated; an episode's
        frame at `timestamp` is at `from_timestamp + timestamp` in its file

A frame row holds the features (`observation.state`, `action`, image
features as `{"bytes", "path"}` structs, ...) and `timestamp`,
`frame_index`, `episode_index`, `index` (global frame index), `task_index`.
"""

import dataclasses
import json
import pathlib

import numpy as np

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
V2_TASKS_PATH = "meta/tasks.jsonl"
V2_EPISODES_PATH = "meta/episodes.jsonl"
V2_EPISODES_STATS_PATH = "meta/episodes_stats.jsonl"
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_TASKS_PATH = "meta/tasks.parquet"
V3_EPISODES_DIR = "meta/episodes"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
DEFAULT_CHUNK_SIZE = 1000
SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
# Columns every LeRobot frame has besides its features.
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")


@dataclasses.dataclass
class Episode:
    """One episode: its frames are global rows `[start, stop)` of the dataset.

    Args:
        index: `episode_index`.
        length: number of frames.
        tasks: the episode's task strings.
        start: global row of the first frame (`dataset_from_index`).
        data_path: its parquet file, relative to the root.
        videos: `{video_key: (mp4 path relative to the root, from_timestamp)}`.
    """

    index: int
    length: int
    tasks: list
    start: int
    data_path: str
    videos: dict

    @property
    def stop(self):
        return self.start + self.length


def _read_text(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a LeRobot dataset needs it.")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} cannot be read as text: {error}") from None


def read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def record_field(item, name, where):
    """`item[name]`, or a `ValueError` saying which record (`where`) lacks it."""
    if not isinstance(item, dict) or name not in item:
        has = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise ValueError(f"{where} has no {name!r}; it has {has}.")
    return item[name]


def read_jsonl(path):
    lines = _read_text(path).splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not valid JSON: {error}") from None
    return out


def stats_to_numpy(stats):
    """`{feature: {stat: list}}` → `{feature: {stat: np.ndarray}}`."""
    return {
        key: {name: np.asarray(value) for name, value in fields.items()}
        for key, fields in stats.items()
    }


def aggregate_stats(stats_list):
    """LeRobot's merge of per-episode stats: count-weighted mean, pooled std, min, max."""
    merged = {}
    for key in {key for stats in stats_list for key in stats}:
        parts = [stats[key] for stats in stats_list if key in stats]
        counts = np.stack([np.asarray(p["count"], np.float64) for p in parts])
        means = np.stack([p["mean"] for p in parts]).astype(np.float64)
        variances = np.stack([p["std"] for p in parts]).astype(np.float64) ** 2
        weights = counts.reshape(counts.shape + (1,) * (means.ndim - counts.ndim))
        total = counts.sum(axis=0)
        mean = (means * weights).sum(axis=0) / total.reshape(weights.shape[1:])
        variance = ((variances + (means - mean) ** 2) * weights).sum(axis=0)
        merged[key] = {
            "min": np.min(np.stack([p["min"] for p in parts]), axis=0),
            "max": np.max(np.stack([p["max"] for p in parts]), axis=0),
            "mean": mean,
            "std": np.sqrt(variance / total.reshape(weights.shape[1:])),
            "count": total,
        }
    return merged


def _read_parquet(path, columns=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing; a LeRobot v3 dataset needs it.")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path} is not a readable parquet file: {reason}") from None


class LeRobotMetadata:
    """The `meta/` of a LeRobot dataset on disk (format v2.0, v2.1 or v3.0).

    Args:
        root: the dataset directory (holding `meta/info.json`).

    Attributes:
        info: `meta/info.json` as a dict.
        version: `"v2.0"`, `"v2.1"` or `"v3.0"`.
        fps: frames per second.
        features: `{key: {"dtype", "shape", "names", ...}}`.
        tasks: `{task_index: task string}`.
        episodes: list of `Episode`, by episode index.
        stats: `{feature: {"mean", "std", "min", "max", ...}}` (numpy), or None.

    Example:
    >>> meta = LeRobotMetadata("/data/aloha_sim_transfer_cube_human")  # doctest: +SKIP
    >>> meta.video_keys, meta.fps  # doctest: +SKIP
    (['observation.images.top'], 50)
    """

    def __init__(self, root):
        self.root = pathlib.Path(root)
        info_path = self.root / INFO_PATH
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a LeRobot dataset: it has no {INFO_PATH}.")
        self.info = read_json(info_path)
        for field in ("codebase_version", "fps", "features", "data_path"):
            if field not in self.info:
                raise ValueError(f"{info_path} has no {field!r}.")
        self.version = str(self.info["codebase_version"])
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{self.root}: LeRobot format {self.version!r} is not supported; "
                f"supported: {SUPPORTED_VERSIONS}."
            )
        self.fps = int(self.info["fps"])
        self.features = self.info["features"]
        if self.is_v3:
            self.tasks = self._v3_tasks()
            self.episodes = self._v3_episodes()
        else:
            path, self.tasks = self.root / V2_TASKS_PATH, {}
            for i, item in enumerate(read_jsonl(path)):
                index = record_field(item, "task_index", f"{path} entry {i}")
                self.tasks[int(index)] = record_field(item, "task", f"{path} entry {i}")
            self.episodes = self._v2_episodes()
        self.stats = self._stats()

    @property
    def is_v3(self):
        return self.version.startswith("v3")

    @property
    def video_keys(self):
        return [k for k, f in self.features.items() if f["dtype"] == "video"]

    @property
    def image_keys(self):
        return [k for k, f in self.features.items() if f["dtype"] == "image"]

    @property
    def camera_keys(self):
        return self.video_keys + self.image_keys

    @property
    def total_frames(self):
        return sum(e.length for e in self.episodes)

    def _v2_episodes(self):
        path = self.root / V2_EPISODES_PATH
        items = read_jsonl(path)
        for i, item in enumerate(items):
            for name in ("episode_index", "length"):
                record_field(item, name, f"{path} entry {i}")
        items = sorted(items, key=lambda e: e["episode_index"])
        chunk_size = int(self.info.get("chunks_size", DEFAULT_CHUNK_SIZE))
        video_path = self.info.get("video_path")
        episodes, start = [], 0
        for item in items:
            index = int(item["episode_index"])
            chunk = index // chunk_size
            videos = {
                key: (
                    video_path.format(episode_chunk=chunk, video_key=key, episode_index=index),
                    0.0,
                )
                for key in self.video_keys
            }
            data_path = self.info["data_path"].format(episode_chunk=chunk, episode_index=index)
            length = int(item["length"])
            episodes.append(
                Episode(index, length, list(item.get("tasks", [])), start, data_path, videos)
            )
            start += length
        return episodes

    def _v3_tasks(self):
        table = _read_parquet(self.root / V3_TASKS_PATH)
        names = table.column_names
        text = "task" if "task" in names else "__index_level_0__"
        if text not in names or "task_index" not in names:
            raise ValueError(
                f"{self.root / V3_TASKS_PATH} needs columns 'task_index' and 'task', got {names}."
            )
        return {
            int(i): t
            for i, t in zip(table.column("task_index").to_pylist(), table.column(text).to_pylist())
        }

    def _v3_episodes(self):
        files = sorted((self.root / V3_EPISODES_DIR).glob("chunk-*/file-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{self.root} has no {V3_EPISODES_DIR}/chunk-*/file-*.parquet.")
        rows = []
        needed = ["episode_index", "dataset_from_index", "dataset_to_index", "data/chunk_index"]
        needed += ["data/file_index"]
        for key in self.video_keys:
            needed += [f"videos/{key}/{n}" for n in ("chunk_index", "file_index", "from_timestamp")]
        for path in files:
            for i, row in enumerate(_read_parquet(path).to_pylist()):
                for name in needed:
                    record_field(row, name, f"{path} row {i}")
                rows.append(row)
        rows.sort(key=lambda r: r["episode_index"])
        episodes = []
        for row in rows:
            data_path = self.info["data_path"].format(
                chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
            )
            videos = {
                key: (
                    self.info["video_path"].format(
                        video_key=key,
                        chunk_index=row[f"videos/{key}/chunk_index"],
                        file_index=row[f"videos/{key}/file_index"],
                    ),
                    float(row[f"videos/{key}/from_timestamp"]),
                )
                for key in self.video_keys
            }
            start = int(row["dataset_from_index"])
            length = int(row["dataset_to_index"]) - start
            episodes.append(
                Episode(
                    int(row["episode_index"]),
                    length,
                    list(row.get("tasks") or []),
                    start,
                    data_path,
                    videos,
                )
            )
        return episodes

    def _stats(self):
        if (self.root / STATS_PATH).is_file():
            return stats_to_numpy(read_json(self.root / STATS_PATH))
        if (self.root / V2_EPISODES_STATS_PATH).is_file():
            items = read_jsonl(self.root / V2_EPISODES_STATS_PATH)
            return aggregate_stats([stats_to_numpy(item["stats"]) for item in items])
        return None

    def data_files(self):
        """The parquet files in order, each with the global row of its first frame."""
        files = {}
        for episode in self.episodes:
            files.setdefault(episode.data_path, episode.start)
        return sorted(files.items(), key=lambda item: item[1])
