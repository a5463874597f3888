"""A LeRobot dataset on local disk (format v2.0, v2.1 or v3.0) as a random-access source of frames.

Sample `i` is one frame as LeRobot's `LeRobotDataset.__getitem__` gives it,
with numpy values and images as (H, W, 3) uint8 (LeRobot gives float CHW;
the robot transforms take either):

    {"observation.images.top": (H, W, 3) uint8, "observation.state": (s,) float32,
     "action": (H_a, a) float32 (a chunk with `delta_timestamps`), "action_is_pad": (H_a,) bool,
     "timestamp", "frame_index", "episode_index", "index", "task_index", "task": str,
     "prompt": str (with `prompt_from_task`)}

Action chunks follow LeRobot's `delta_timestamps`: key `k` with offsets
`[0, 1/fps, ..., (H-1)/fps]` gets the frames `t, t+1, ..., t+H-1` of the
same episode; offsets past the episode's end take its last frame (so the
last action repeats) and are flagged in `k_is_pad`. openpi asks for exactly
this with `action_horizon=H` (`action_sequence_keys`, default `("action",)`).
"""

import bisect
import collections
import pathlib
import threading

import numpy as np

from keras_openpi.data.finite import count_non_finite_rows
from keras_openpi.data.finite import first_non_finite
from keras_openpi.data.finite import within_frame
from keras_openpi.data.lerobot_format import INDEX_FEATURES
from keras_openpi.data.lerobot_format import LeRobotMetadata
from keras_openpi.data.video import DEFAULT_TOLERANCE_S
from keras_openpi.data.video import VideoFrameReader
from keras_openpi.data.video import decode_image


_NUMERIC_DTYPES = {
    *(f"float{b}" for b in (16, 32, 64)),
    *(f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)),
    "bool",
}


def delta_timestamps_for(keys, action_horizon, fps):
    """openpi's `delta_timestamps`: `{key: [t / fps for t in range(action_horizon)]}`."""
    return {key: [t / fps for t in range(action_horizon)] for key in keys}


def delta_indices(delta_timestamps, fps, tolerance_s=DEFAULT_TOLERANCE_S):
    """Frame offsets of `delta_timestamps`: multiples of `1 / fps`, as LeRobot checks."""
    out = {}
    for key, offsets in delta_timestamps.items():
        offsets = [float(t) for t in offsets]
        if not offsets:
            raise ValueError(f"delta_timestamps[{key!r}] is empty.")
        off_grid = [t for t in offsets if abs(t * fps - round(t * fps)) / fps > tolerance_s]
        if off_grid:
            raise ValueError(
                f"delta_timestamps[{key!r}] must be multiples of 1/fps = 1/{fps} s "
                f"(within {tolerance_s} s), got {off_grid}."
            )
        out[key] = np.array([round(t * fps) for t in offsets], dtype=np.int64)
    return out


def _column_to_numpy(column, name):
    """A parquet column (scalars or (nested) lists of one length) as an (N, ...) numpy array."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    rows, shape = len(array), []
    while pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type):
        if pa.types.is_fixed_size_list(array.type):
            width = array.type.list_size
        else:
            lengths = np.unique(array.value_lengths().to_numpy(zero_copy_only=False))
            if len(lengths) > 1:
                raise ValueError(f"column {name!r} holds lists of different lengths {lengths}.")
            width = int(lengths[0]) if len(lengths) else 0
        shape.append(width)
        array = array.flatten()
    values = array.to_numpy(zero_copy_only=False)
    return values.reshape((rows, *shape))


def _reason(error):
    """The first line of an error, for a one-line message."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _episode_list(indices):
    """`episode 3`, `episodes 0-4` or `episodes 1, 5, 9`."""
    indices = sorted(indices)
    if len(indices) == 1:
        return f"episode {indices[0]}"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"episodes {indices[0]}-{indices[-1]}"
    shown = ", ".join(str(i) for i in indices[:5]) + (", ..." if len(indices) > 5 else "")
    return f"episodes {shown}"


def read_parquet_file(path, columns, holds):
    """A parquet table with `columns`, or a one-line error naming the file and what it `holds`.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it is not readable parquet, or lacks a column.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; it holds {holds}.")
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path} ({holds}) has no column {missing[0]!r}; it has {names}.")
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise ValueError(
            f"{path} ({holds}) is not a readable parquet file: {_reason(error)}"
        ) from None


class _ImageColumn:
    """Lazily read `image` feature column: row groups read on demand, a few cached per thread."""

    def __init__(self, root, files, key, cache_size=4):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.key = key
        self.cache_size = cache_size
        self._files = []  # (global start, path, [row group starts])
        for path, start in files:
            try:
                metadata = pq.ParquetFile(root / path).metadata
            except (OSError, pa.ArrowException) as error:
                raise ValueError(
                    f"{root / path} is not a readable parquet file: {_reason(error)}"
                ) from None
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            self._files.append((start, root / path, list(np.cumsum([0] + sizes[:-1]))))
        self._starts = [start for start, _, _ in self._files]
        self._local = threading.local()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _row_group(self, path, group):
        import pyarrow as pa
        import pyarrow.parquet as pq

        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = collections.OrderedDict()
        if (path, group) not in cache:
            if len(cache) >= self.cache_size:
                cache.popitem(last=False)
            try:
                table = pq.ParquetFile(path).read_row_group(group, columns=[self.key])
            except (OSError, pa.ArrowException) as error:
                raise ValueError(f"{path}: cannot read {self.key!r}: {_reason(error)}") from None
            cache[(path, group)] = table.column(self.key).combine_chunks()
        cache.move_to_end((path, group))
        return cache[(path, group)]

    def __getitem__(self, row):
        file = bisect.bisect_right(self._starts, row) - 1
        start, path, group_starts = self._files[file]
        local = row - start
        group = bisect.bisect_right(group_starts, local) - 1
        value = self._row_group(path, group)[local - group_starts[group]].as_py()
        data = value["bytes"] if isinstance(value, dict) else value
        if data is None and isinstance(value, dict) and value.get("path"):
            data = pathlib.Path(value["path"]).read_bytes()
        return decode_image(data, self.key)


class LeRobotDataset:
    """Frames of a LeRobot dataset on disk, by index, with action chunks and decoded cameras.

    Numeric columns are read into memory once; videos are decoded with
    PyAV per query (seek to the keyframe before it); `image` features are
    read per parquet row group. Instances can be shared by threads and
    pickled into worker processes.

    Args:
        root: the dataset directory (holding `meta/info.json`).
        action_horizon: openpi's chunking: `delta_timestamps` of the next
            `action_horizon` frames for each of `action_keys`.
        action_keys: openpi's `action_sequence_keys` (default `("action",)`).
        delta_timestamps: LeRobot's `{key: [seconds, ...]}` (instead of
            `action_horizon`); works for video keys too.
        prompt_from_task: add `prompt` = the frame's task string (openpi's
            `PromptFromLeRobotTask`).
        episodes: only these episode indices (default all).
        keys: only these feature keys (e.g. skip cameras for norm stats);
            the index columns and `task` are always there.
        tolerance_s: how far a decoded video frame may lie from its timestamp.

    Example:
    >>> data = LeRobotDataset("/data/aloha_sim", action_horizon=50)  # doctest: +SKIP
    >>> data[0]["action"].shape, data[0]["observation.images.top"].shape  # doctest: +SKIP
    ((50, 14), (480, 640, 3))
    """

    def __init__(
        self,
        root,
        *,
        action_horizon=None,
        action_keys=("action",),
        delta_timestamps=None,
        prompt_from_task=False,
        episodes=None,
        keys=None,
        tolerance_s=DEFAULT_TOLERANCE_S,
    ):
        self.root = pathlib.Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"no LeRobot dataset at {self.root}.")
        self.meta = LeRobotMetadata(self.root)
        self.prompt_from_task = prompt_from_task
        if action_horizon is not None and delta_timestamps is not None:
            raise ValueError("give either action_horizon or delta_timestamps, not both.")
        if action_horizon is not None:
            if int(action_horizon) < 1:
                raise ValueError(f"action_horizon must be at least 1, got {action_horizon}.")
            delta_timestamps = delta_timestamps_for(action_keys, int(action_horizon), self.meta.fps)
        features = self.meta.features
        wanted = list(features) if keys is None else list(keys)
        unknown = [k for k in [*wanted, *(delta_timestamps or {})] if k not in features]
        if unknown:
            raise ValueError(
                f"{self.root}: no feature {unknown[0]!r}; the dataset has {sorted(features)}."
            )
        self.keys = [k for k in wanted if k not in INDEX_FEATURES]
        self.delta = delta_indices(delta_timestamps or {}, self.meta.fps, tolerance_s)
        self.keys += [k for k in self.delta if k not in self.keys]
        self._video_keys = [k for k in self.keys if features[k]["dtype"] == "video"]
        image_keys = [k for k in self.keys if features[k]["dtype"] == "image"]
        # Row of each frame's episode, for chunk clamping and messages.
        self._episode_of_row = np.repeat(
            np.arange(len(self.meta.episodes)), [e.length for e in self.meta.episodes]
        )
        self._episode_position = {e.index: i for i, e in enumerate(self.meta.episodes)}
        self._select(episodes)
        self._load_columns([k for k in self.keys if k not in self._video_keys + image_keys])
        files = self.meta.data_files()
        self._images = {key: _ImageColumn(self.root, files, key) for key in image_keys}
        self._check_videos_exist()
        self._videos = VideoFrameReader(tolerance_s)

    # === Loading ===

    def _load_columns(self, keys):
        """Reads the numeric columns of every data file, checking each file and every value."""
        import pyarrow as pa

        columns = [*INDEX_FEATURES, *keys]
        holds = {}
        for episode in self.meta.episodes:
            holds.setdefault(episode.data_path, []).append(episode)
        tables, offset = [], 0
        for path, start in self.meta.data_files():
            episodes = holds[path]
            names = _episode_list([e.index for e in episodes])
            what = f"{names} of {self.root}"
            if start != offset:
                raise ValueError(
                    f"{self.root / path} starts at frame {start} but the files before it end "
                    f"at frame {offset}: meta/episodes does not match data/."
                )
            table = read_parquet_file(self.root / path, columns, what)
            expected = sum(e.length for e in episodes)
            if table.num_rows != expected:
                raise ValueError(
                    f"{self.root / path} holds {table.num_rows} frames but meta/ lists {expected} "
                    f"for its {names}: the file is truncated or meta/ is out of date."
                )
            try:
                tables.append({n: _column_to_numpy(table.column(n), n) for n in columns})
            except (ValueError, pa.ArrowException) as error:
                raise ValueError(f"{self.root / path} ({what}): {_reason(error)}") from None
            offset += table.num_rows
        self._columns = {}
        for name in columns:  # numpy promotes e.g. one file's float64 with the others' float32
            shapes = {t[name].shape[1:] for t in tables}
            if len(shapes) > 1:
                raise ValueError(
                    f"{self.root}: column {name!r} has frames of shapes {sorted(shapes)} in "
                    "different data files."
                )
            self._columns[name] = np.concatenate([t[name] for t in tables])
        for name in keys:  # as LeRobot casts to info.json's dtypes
            dtype = self.meta.features[name]["dtype"]
            raw = self._columns[name]
            self._check_finite(name, raw)
            if dtype in _NUMERIC_DTYPES:
                with np.errstate(over="ignore", invalid="ignore"):  # checked just below
                    self._columns[name] = raw.astype(dtype)
                if self._columns[name].dtype != raw.dtype:  # e.g. float64 1e300 -> float32 inf
                    self._check_finite(name, self._columns[name], f" (as info.json's {dtype})")
        self._check_finite("timestamp", self._columns["timestamp"])

    def _check_finite(self, name, values, cast=""):
        """Raises a `ValueError` naming the file, episode, frame and key of the first NaN / inf.

        Only the selected episodes count, so leaving bad ones out is a way around.
        """
        selected = values if self._selected is self.meta.episodes else values[self._rows]
        bad = first_non_finite(selected)
        if bad is None:
            return
        row = int(self._rows[bad[0][0]])
        episode = self.meta.episodes[self._episode_of_row[row]]
        count = count_non_finite_rows(selected)
        raise ValueError(
            f"{self.root / episode.data_path}: episode {episode.index} frame "
            f"{row - episode.start} {name!r} holds {bad[1]}{within_frame(bad[0][1:])}{cast} "
            f"({count} of {len(selected)} frames hold NaN or inf there). Fix the data, or leave "
            "those episodes (episodes=[...]) or that feature (keys=[...]) out."
        )

    def _check_videos_exist(self):
        missing, total = [], 0
        for episode in self._selected:
            for key in self._video_keys:
                total += 1
                path = self.root / episode.videos[key][0]
                if not path.is_file():
                    missing.append((path, key, episode.index))
        if missing:
            path, key, index = missing[0]
            raise FileNotFoundError(
                f"{path} is missing: the {key!r} video of episode {index} ({len(missing)} of the "
                f"{total} videos of the selected episodes are missing)."
            )

    def _select(self, episodes):
        all_episodes = self.meta.episodes
        if episodes is None:
            self._selected = all_episodes
            self._rows = np.arange(self.meta.total_frames)
            return
        missing = [e for e in episodes if e not in self._episode_position]
        if missing:
            raise ValueError(
                f"{self.root}: no episode {missing[0]}; it has episodes "
                f"{all_episodes[0].index}..{all_episodes[-1].index}."
            )
        self._selected = [all_episodes[self._episode_position[e]] for e in episodes]
        self._rows = np.concatenate([np.arange(e.start, e.stop) for e in self._selected])

    # === Access ===

    @property
    def fps(self):
        return self.meta.fps

    @property
    def tasks(self):
        return self.meta.tasks

    def __len__(self):
        return len(self._rows)

    def _query_rows(self, row, offsets):
        episode = self.meta.episodes[self._episode_of_row[row]]
        wanted = row + offsets
        rows = np.clip(wanted, episode.start, episode.stop - 1)
        return rows, (wanted < episode.start) | (wanted >= episode.stop)

    def _video_frames(self, key, episode, rows):
        path, offset = episode.videos[key]
        timestamps = self._columns["timestamp"][rows].astype(np.float64) + offset
        return self._videos.read(self.root / path, timestamps)

    def _camera(self, key, episode, rows):
        """(len(rows), H, W, 3) uint8 frames of a camera feature; errors name the episode."""
        try:
            if key in self._video_keys:
                return self._video_frames(key, episode, rows)
            return np.stack([self._images[key][int(r)] for r in rows])
        except (ValueError, OSError) as error:
            raise ValueError(
                f"episode {episode.index} frame {int(rows[0]) - episode.start} {key!r}: "
                f"{_reason(error)}"
            ) from None

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame {index} out of range for {len(self)} frames.")
        row = int(self._rows[index])
        episode = self.meta.episodes[self._episode_of_row[row]]
        sample = {name: self._columns[name][row] for name in INDEX_FEATURES}
        for key in self.keys:
            if key in self.delta:
                rows, pad = self._query_rows(row, self.delta[key])
                sample[f"{key}_is_pad"] = pad
            else:
                rows = np.array([row])
            if key in self._video_keys or key in self._images:
                value = self._camera(key, episode, rows)
            else:
                value = self._columns[key][rows]
            sample[key] = value if key in self.delta else value[0]
        task_index = int(sample["task_index"])
        if task_index not in self.meta.tasks:
            raise ValueError(
                f"{self.root}: frame {row} has task_index {task_index}, which meta/tasks lacks."
            )
        sample["task"] = self.meta.tasks[task_index]
        if self.prompt_from_task:
            sample["prompt"] = sample["task"]
        return sample

    def episode(self, episode_index):
        """Every frame of one episode, stacked: `{key: (T, ...)}` plus `task` (its first frame's).

        The format `LeRobotWriter.add_episode` takes (e.g. to convert v3 to v2.1).
        """
        if episode_index not in self._episode_position:
            raise ValueError(f"{self.root}: no episode {episode_index}.")
        episode = self.meta.episodes[self._episode_position[episode_index]]
        rows = np.arange(episode.start, episode.stop)
        out = {}
        for key in self.keys:
            if key in self._video_keys or key in self._images:
                out[key] = self._camera(key, episode, rows)
            else:
                out[key] = self._columns[key][rows]
        out["task"] = [self.meta.tasks[int(i)] for i in self._columns["task_index"][rows]]
        return out

    def column(self, key):
        """All values of a numeric feature over the selected frames: (N, ...) numpy."""
        if key not in self._columns:
            raise ValueError(
                f"{key!r} is not a loaded numeric column; loaded: {sorted(self._columns)}."
            )
        return self._columns[key][self._rows]
