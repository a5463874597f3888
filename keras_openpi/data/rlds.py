"""RLDS datasets (TFDS builder directories on disk) as sources of frames with action chunks.

An RLDS episode is `{"steps": [step, ...], "episode_metadata": {...}}`; a
step holds `observation/...`, `action`, `language_instruction`, ... A
mapping names which step features make each sample key:

    RldsDataset(
        "/data/droid/1.0.1",
        keys={
            "observation/image": "observation/exterior_image_1_left",
            "observation/wrist_image": "observation/wrist_image_left",
            "observation/joint_position": "observation/joint_position",
            "observation/gripper_position": "observation/gripper_position",
            "actions": ["action_dict/joint_position", "action_dict/gripper_position"],
        },
        prompt=["language_instruction", "language_instruction_2", "language_instruction_3"],
        action_horizon=16,
    )

A list of paths is concatenated on the last axis; `prompt` picks one of
several instructions (a non-empty one, at random, as openpi's DROID loader
does). Keys in `chunk_keys` become chunks of the next `action_horizon` steps,
the last step repeated past the episode's end (openpi's DROID chunking),
flagged in `<key>_is_pad`.

array_record datasets are read with `as_data_source` (random access: frame
`i` by index; images decoded here with PyAV); tfrecord datasets are read
with `as_dataset` through TensorFlow (streaming: `iterate`). TensorFlow is
kept off accelerators (`tf.config.set_visible_devices([], "GPU")`) before it
runs any op.
"""

import collections
import pathlib
import threading

import numpy as np

from keras_openpi.data.finite import first_non_finite
from keras_openpi.data.finite import within_frame
from keras_openpi.data.transforms import flatten_dict
from keras_openpi.data.video import decode_image

_MAX_STEPS = 1 << 30


def _tensorflow():
    """TensorFlow, with every GPU hidden from it (JAX owns the accelerators)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialized its devices
        if tf.config.get_visible_devices("GPU"):
            raise RuntimeError(
                "TensorFlow was initialized with GPUs visible before the RLDS reader could hide "
                "them, so it would take accelerator memory. Create the RldsDataset before running "
                "any TensorFlow op, or call tf.config.set_visible_devices([], 'GPU') first."
            ) from None
    return tf


def _tfds():
    _tensorflow()
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "RLDS datasets need tensorflow-datasets: pip install 'keras-openpi[rlds]'."
        ) from None
    return tfds


def find_builder_dir(path, name=None, version=None):
    """The TFDS builder directory (with `dataset_info.json`) at `path[/name[/version]]`."""
    path = pathlib.Path(path)
    if name is not None:
        path = path / name
    if version is not None:
        path = path / str(version)
    if (path / "dataset_info.json").is_file():
        return path
    versions = sorted(
        (p for p in path.glob("*") if (p / "dataset_info.json").is_file()),
        key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")),
    )
    if not versions:
        raise FileNotFoundError(
            f"no TFDS dataset at {path}: expected a directory with dataset_info.json "
            "(a builder's version directory, e.g. <data_dir>/droid/1.0.1)."
        )
    return versions[-1]


def _stack(values):
    """Stacks step values; bytes (encoded images, text) stay Python objects."""
    if isinstance(values[0], bytes):
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array
    return np.stack(values)


def _text(value):
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RldsDataset:
    """Frames of an RLDS dataset, mapped to sample keys, with action chunks.

    Args:
        path: a TFDS builder directory (with `dataset_info.json`), or its
            parent `data_dir` with `name` (and `version`; default the latest).
        keys: `{sample key: step feature path or list of paths}`.
        prompt: step path of the instruction, or a list of paths to choose
            from; None for no prompt.
        action_horizon: chunk length H of `chunk_keys` (None: no chunks).
        chunk_keys: sample keys made into chunks.
        split: TFDS split (slicing like `train[:90%]` works).
        name: builder name under `path`.
        version: builder version under `path/name`.
        episode_filter: `f(episode_metadata: dict) -> bool` keeping episodes
            (e.g. openpi's DROID keeps `file_path`s containing "success").
        seed: seed of the prompt choice (an int or a list of ints).

    Example:
    >>> keys = {"image": "observation/image_0", "state": "observation/state", "actions": "action"}
    >>> data = RldsDataset("/data/bridge/1.0.0", keys, action_horizon=4)  # doctest: +SKIP
    >>> data[0]["actions"].shape  # doctest: +SKIP
    (4, 7)
    """

    def __init__(
        self,
        path,
        keys,
        *,
        prompt=None,
        action_horizon=None,
        chunk_keys=("actions",),
        split="train",
        name=None,
        version=None,
        episode_filter=None,
        seed=0,
    ):
        tfds = _tfds()
        self.builder_dir = find_builder_dir(path, name, version)
        self._builder = tfds.builder_from_directory(str(self.builder_dir))
        self.split = split
        self.keys = {k: [v] if isinstance(v, str) else list(v) for k, v in keys.items()}
        self.prompt_paths = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if action_horizon is not None and int(action_horizon) < 1:
            raise ValueError(f"action_horizon must be at least 1, got {action_horizon}.")
        self.action_horizon = action_horizon
        self.chunk_keys = tuple(chunk_keys) if action_horizon is not None else ()
        missing = [k for k in self.chunk_keys if k not in self.keys]
        if missing:
            raise ValueError(f"chunk key {missing[0]!r} is not among the keys {sorted(self.keys)}.")
        self.episode_filter = episode_filter
        self.seed = seed
        self._check_paths()
        self.file_format = self._builder.info.file_format.value
        self.random_access = self.file_format == "array_record"
        self._local = threading.local()
        if self.random_access:
            self._scan()

    # === Features ===

    def _step_features(self):
        features = self._builder.info.features
        if "steps" not in features:
            raise ValueError(f"{self.builder_dir} is not RLDS: its features have no 'steps'.")
        return features["steps"].feature

    def _check_paths(self):
        tfds = _tfds()
        flat = flatten_dict(self._step_features().get_serialized_info())
        available = sorted(flat)
        self._image_paths = set()
        paths = [p for ps in self.keys.values() for p in ps] + self.prompt_paths
        for path in paths:
            if path not in flat:
                raise ValueError(
                    f"{self.builder_dir}: the steps have no feature {path!r}; "
                    f"they have {available}."
                )
        for path in available:
            feature = self._step_features()
            for part in path.split("/"):
                feature = feature[part]
            if isinstance(feature, tfds.features.Image):
                self._image_paths.add(path)

    def _skip_image_decoding(self):
        tfds = _tfds()
        tree = {}
        for path in self._image_paths:
            *parents, leaf = path.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = tfds.decode.SkipDecoding()
        return {"steps": tree} if tree else None

    # === Random access (array_record) ===

    def _source(self):
        source = getattr(self._local, "source", None)
        if source is None:
            source = self._local.source = self._builder.as_data_source(
                split=self.split, decoders=self._skip_image_decoding()
            )
        return source

    def _scan(self):
        """Episode lengths (and the filter): reads every episode record once."""
        source = self._source()
        self._episodes, lengths = [], []
        for index in range(len(source)):
            episode = source[index]
            if self.episode_filter is not None:
                metadata = episode.get("episode_metadata", {})
                if not self.episode_filter(metadata):
                    continue
            length = len(episode["steps"])
            if length:
                self._episodes.append(index)
                lengths.append(length)
        if not self._episodes:
            raise ValueError(f"{self.builder_dir} split {self.split!r}: no episodes with steps.")
        self._starts = np.cumsum([0] + lengths)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_builder")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._builder = _tfds().builder_from_directory(str(self.builder_dir))
        self._local = threading.local()

    def __len__(self):
        if not self.random_access:
            raise TypeError(
                f"{self.builder_dir} is stored as {self.file_format}: it streams (use iterate()); "
                "only array_record datasets have random access."
            )
        return int(self._starts[-1])

    def _episode_arrays(self, position):
        """`{flat step path: (T, ...) array}` of the `position`-th episode (images encoded).

        Checked finite when read; a few are cached per thread.
        """
        index = self._episodes[position]
        cache = getattr(self._local, "episodes", None)
        if cache is None:
            cache = self._local.episodes = collections.OrderedDict()
        if index not in cache:
            steps = self._source()[index]["steps"]
            flat = [flatten_dict(steps[t]) for t in range(len(steps))]
            episode = {k: _stack([f[k] for f in flat]) for k in flat[0]}
            self._check_finite(episode, position)
            cache[index] = episode
            if len(cache) > 2:
                cache.popitem(last=False)
        return cache[index]

    def _check_finite(self, episode, position):
        """Raises a `ValueError` naming the episode, step and feature of the first NaN / inf."""
        for path in sorted({p for paths in self.keys.values() for p in paths}):
            values = episode.get(path)
            bad = None if values is None or values.dtype == object else first_non_finite(values)
            if bad is not None:
                raise ValueError(
                    f"{self.builder_dir} split {self.split!r}: episode {position} step "
                    f"{bad[0][0]} {path!r} holds {bad[1]}{within_frame(bad[0][1:])}; fix the "
                    "data or filter that episode out (episode_filter)."
                )

    def __getitem__(self, index):
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"frame {index} out of range for {size} frames.")
        index %= size
        position = int(np.searchsorted(self._starts, index, side="right") - 1)
        episode = self._episode_arrays(position)
        return self._frame(episode, index - int(self._starts[position]), position)

    # === Samples ===

    def _value(self, episode, paths, rows, key):
        parts = []
        for path in paths:
            values = episode[path][rows]
            if path in self._image_paths and values.dtype == object:
                values = np.stack([decode_image(v, path) for v in values])
            parts.append(values)
        if len(parts) == 1:
            return parts[0]
        try:
            return np.concatenate([p.reshape(len(rows), -1) for p in parts], axis=-1)
        except ValueError as error:
            raise ValueError(f"cannot concatenate the features of {key!r}: {error}") from None

    def _frame(self, episode, step, episode_position):
        length = len(next(iter(episode.values())))
        sample = {}
        for key, paths in self.keys.items():
            if key in self.chunk_keys:
                wanted = step + np.arange(self.action_horizon)
                sample[key] = self._value(episode, paths, np.minimum(wanted, length - 1), key)
                sample[f"{key}_is_pad"] = wanted >= length
            else:
                sample[key] = self._value(episode, paths, np.array([step]), key)[0]
        if self.prompt_paths:
            texts = [_text(episode[path][step]) for path in self.prompt_paths]
            texts = [t for t in texts if t] or [""]
            rng = np.random.default_rng([self.seed, episode_position, step])
            sample["prompt"] = texts[rng.integers(len(texts))]
        sample["episode_index"] = np.int64(episode_position)
        sample["frame_index"] = np.int64(step)
        return sample

    # === Streaming (any format) ===

    def episodes(self, shuffle=False, seed=0):
        """Yields `(episode position, {flat step path: (T, ...) array})` in storage order.

        With `shuffle`, episodes (array_record) or files (tfrecord) come in a
        seeded random order. tfrecord datasets are read through tf.data (images decoded by TF);
        array_record ones through the data source.
        """
        if self.random_access:
            order = np.arange(len(self._episodes))
            if shuffle:
                order = np.random.default_rng(seed).permutation(order)
            for position in order:
                yield int(position), self._episode_arrays(int(position))
            return
        tf, tfds = _tensorflow(), _tfds()
        file_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
        read_config = tfds.ReadConfig(
            shuffle_seed=file_seed, interleave_cycle_length=1, enable_ordering_guard=False
        )
        dataset = self._builder.as_dataset(
            split=self.split, shuffle_files=shuffle, read_config=read_config
        )

        def stack_steps(episode):
            out = dict(episode)
            out["steps"] = tf.data.Dataset.get_single_element(episode["steps"].batch(_MAX_STEPS))
            return out

        dataset = dataset.filter(lambda e: e["steps"].cardinality() != 0)
        dataset = dataset.map(stack_steps).prefetch(2)
        position = 0
        for episode in tfds.as_numpy(dataset):
            metadata = episode.get("episode_metadata", {})
            if self.episode_filter is not None and not self.episode_filter(metadata):
                continue
            steps = flatten_dict(episode["steps"])
            self._check_finite(steps, position)
            yield position, steps
            position += 1

    def iterate(self, shuffle=False, seed=0, buffer_size=1000):
        """Frames of one pass over the data.

        With `shuffle`, the episode order (array_record) or the file order
        (tfrecord) is shuffled and frames go through a shuffle buffer of
        `buffer_size` frames; `seed` (an int or a list of ints) fixes both.
        """
        rng = np.random.default_rng(seed)
        buffer = []
        for position, episode in self.episodes(shuffle=shuffle, seed=seed):
            length = len(next(iter(episode.values())))
            for step in range(length):
                sample = self._frame(episode, step, position)
                if not shuffle:
                    yield sample
                    continue
                if len(buffer) < buffer_size:
                    buffer.append(sample)
                    continue
                slot = rng.integers(buffer_size)
                yield buffer[slot]
                buffer[slot] = sample
        rng.shuffle(buffer)
        yield from buffer
