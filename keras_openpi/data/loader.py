"""Batches of transformed samples for `model.fit`, prefetched by worker threads, with exact resume.

`DataLoader` is a `keras.utils.PyDataset`: `model.fit(loader, steps_per_epoch=...)`
draws `loader[0], loader[1], ...` from worker threads, and a plain
`for observation, actions in loader` prefetches the same batches in the
background. Batch `b` is a pure function of `(seed, b)`: with random-access
sources the samples of batch `b` are positions `b * B ... (b + 1) * B - 1` of
the concatenation of per-epoch permutations (epoch `e` shuffled with seed
`(seed, e)`, the incomplete last batch of an epoch dropped, as openpi's
loader does). So the data-iterator position is one integer, the index of the
next global batch, and a restored loader yields exactly the batches the
interrupted one would have.

Streaming sources (tfrecord RLDS) are read in order through a seeded
shuffle buffer; resuming there replays the stream up to the position
without transforming it.
"""

import collections
import concurrent.futures
import itertools
import os
import threading
from collections.abc import Mapping

import keras
import numpy as np

from keras_openpi.data.transforms import compose

# The observation keys of `Pi0` (and π0-FAST's extra token masks).
OBSERVATION_KEYS = (
    "image",
    "image_mask",
    "state",
    "tokenized_prompt",
    "tokenized_prompt_mask",
    "token_ar_mask",
    "token_loss_mask",
)
STATE_VERSION = 1


def _stack(values, path):
    first = values[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for value in values[1:]:
            if list(value) != keys:
                raise ValueError(
                    f"samples disagree on the keys of {path or 'the sample'!r}: {keys} vs "
                    f"{list(value)}."
                )
        return {
            key: _stack([v[key] for v in values], f"{path}/{key}" if path else key) for key in keys
        }
    if isinstance(first, (str, bytes)):
        return np.array(values)
    arrays = [np.asarray(v) for v in values]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"samples disagree on the shape of {path!r}: {sorted(shapes)}.")
    batch = np.stack(arrays)
    return batch.astype(np.float32) if batch.dtype == np.float64 else batch


def collate(samples, model_inputs=True):
    """Stacks sample dicts into one batch (float64 → float32).

    Args:
        samples: list of (nested) sample dicts with equal structure.
        model_inputs: return `(observation, actions)` with the model's
            observation keys (`OBSERVATION_KEYS`) only; otherwise the stacked dict.

    Example:
    >>> obs, actions = collate([{"state": np.zeros(2), "actions": np.ones((3, 2))}] * 4)
    >>> obs["state"].shape, actions.shape, actions.dtype
    ((4, 2), (4, 3, 2), dtype('float32'))
    """
    batch = _stack(list(samples), "")
    if not model_inputs:
        return batch
    if "actions" not in batch:
        raise ValueError(
            "a training batch needs 'actions' after the transforms; the samples have "
            f"{sorted(batch)}."
        )
    observation = {k: batch[k] for k in OBSERVATION_KEYS if k in batch}
    return observation, batch["actions"]


def _is_random_access(source):
    has_items = hasattr(source, "__len__") and hasattr(source, "__getitem__")
    return has_items and getattr(source, "random_access", True)


class _Stream:
    """Raw global batches of a streaming source, repeated over epochs, pulled in order.

    Pulling is sequential (under a lock); batches pulled ahead for other
    threads wait in a small buffer. A request behind the stream restarts it
    and replays up to the position (without transforms).
    """

    def __init__(self, source, batch_size, shuffle, seed, shuffle_buffer, num_epochs, window):
        self.source = source
        self.batch_size = batch_size
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.num_epochs = num_epochs
        self.window = window
        self.lock = threading.Lock()
        self.cursor = None  # index of the next batch the iterator gives
        self.ready = collections.OrderedDict()

    def _samples(self):
        epochs = itertools.count() if self.num_epochs is None else range(self.num_epochs)
        for epoch in epochs:
            yield from self.source.iterate(
                shuffle=self.shuffle, seed=[self.seed, epoch], buffer_size=self.shuffle_buffer
            )

    def _pull(self):
        batch = list(itertools.islice(self.iterator, self.batch_size))
        if len(batch) < self.batch_size:
            raise IndexError(f"the data stream ended before batch {self.cursor}.")
        self.cursor += 1
        return batch

    def raw_batch(self, index):
        with self.lock:
            if index in self.ready:
                return self.ready.pop(index)
            if self.cursor is None or index < self.cursor:
                self.iterator, self.cursor = self._samples(), 0
                self.ready.clear()
            while self.cursor < index:
                self.ready[self.cursor] = self._pull()
                if len(self.ready) > self.window:
                    self.ready.popitem(last=False)
            return self._pull()


class DataLoader(keras.utils.PyDataset):
    """Shuffled, transformed, batched samples: `(observation, actions)` numpy batches for `fit`.

    Args:
        source: random access (`len(source)`, `source[i]`: `LeRobotDataset`,
            `ProceduralDataset`, array_record `RldsDataset`, a list) or
            streaming (`source.iterate(shuffle, seed, buffer_size)`:
            tfrecord `RldsDataset`).
        batch_size: the global batch size B.
        transform: a callable on one sample, or a sequence of them (e.g.
            `build_transforms(...).inputs`); None keeps the samples as they are.
        shuffle: reshuffle every epoch (seeded).
        seed: seed of the order.
        num_epochs: None repeats forever (`num_batches` None: give `fit` a
            `steps_per_epoch`); N makes one pass of N epochs.
        start: global index of the batch `loader[0]` is (resume position).
        shard: `(process_index, process_count)`: this process's part of each
            global batch (`batch_size / process_count` samples), for multi-host runs.
        model_inputs: batches are `(observation, actions)` (the model's keys);
            False gives the stacked sample dicts.
        workers: threads that assemble batches in parallel.
        max_queue_size: batches prefetched ahead.
        shuffle_buffer: frames in a streaming source's shuffle buffer.

    Example:
    >>> from keras_openpi.data.procedural_source import ProceduralDataset
    >>> loader = DataLoader(ProceduralDataset(4, image_size=32), 8, model_inputs=False)
    >>> loader[0]["actions"].shape
    (8, 10, 3)
    >>> state = loader.state(next_batch=5)
    >>> DataLoader(ProceduralDataset(4, image_size=32), 8, model_inputs=False).restore(state).start
    5
    """

    def __init__(
        self,
        source,
        batch_size,
        *,
        transform=None,
        shuffle=True,
        seed=0,
        num_epochs=None,
        start=0,
        shard=None,
        model_inputs=True,
        workers=None,
        max_queue_size=8,
        shuffle_buffer=10_000,
    ):
        workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max_queue_size)
        self.source = source
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.shard = (0, 1) if shard is None else tuple(int(x) for x in shard)
        index, count = self.shard
        if not 0 <= index < count or self.batch_size % count:
            raise ValueError(
                f"shard {self.shard}: the batch size {self.batch_size} must divide evenly over "
                f"{count} processes and the process index be in [0, {count})."
            )
        if transform is None or callable(transform):
            self.transform = transform
        else:
            self.transform = compose(transform)
        self.shuffle, self.seed = shuffle, int(seed)
        self.num_epochs = num_epochs
        self.model_inputs = model_inputs
        self.random_access = _is_random_access(source)
        if self.random_access:
            self.num_samples = len(source)
            if self.num_samples < self.batch_size:
                raise ValueError(
                    f"the source has {self.num_samples} samples, fewer than one batch of "
                    f"{self.batch_size}."
                )
            self.batches_per_epoch = self.num_samples // self.batch_size
            self._orders = {}
            self._orders_lock = threading.Lock()
        elif hasattr(source, "iterate"):
            self.num_samples = None
            self.batches_per_epoch = None
            self._stream = _Stream(
                source,
                self.batch_size,
                shuffle,
                self.seed,
                shuffle_buffer,
                num_epochs,
                window=2 * (workers + max_queue_size),
            )
        else:
            raise ValueError(
                f"the source ({type(source).__name__}) must have random access (len and [i]) "
                "or an iterate(shuffle, seed, buffer_size) method."
            )
        self.restore({"next_batch": int(start)}, check=False)

    # === Batches ===

    def _order(self, epoch):
        """The sample order of one epoch (a few recent epochs cached)."""
        with self._orders_lock:
            if epoch not in self._orders:
                if self.shuffle:
                    order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                else:
                    order = np.arange(self.num_samples)
                self._orders[epoch] = order
                for old in sorted(self._orders)[:-2]:
                    del self._orders[old]
            return self._orders[epoch]

    def sample_indices(self, batch):
        """Source positions of this process's samples in global batch `batch` (random access)."""
        epoch, within = divmod(int(batch), self.batches_per_epoch)
        indices = self._order(epoch)[within * self.batch_size : (within + 1) * self.batch_size]
        index, count = self.shard
        local = self.batch_size // count
        return indices[index * local : (index + 1) * local]

    def _local_part(self, samples):
        index, count = self.shard
        local = self.batch_size // count
        return samples[index * local : (index + 1) * local]

    def batch(self, index):
        """Global batch `index`, transformed and collated."""
        if self.random_access:
            if self.num_epochs is not None and index >= self.num_epochs * self.batches_per_epoch:
                raise IndexError(f"batch {index} is past the last of {self.num_epochs} epochs.")
            samples = [self.source[int(i)] for i in self.sample_indices(index)]
        else:
            samples = self._local_part(self._stream.raw_batch(index))
        if self.transform is not None:
            samples = [self.transform(sample) for sample in samples]
        return collate(samples, self.model_inputs)

    # === keras.utils.PyDataset ===

    @property
    def num_batches(self):
        if self.num_epochs is None or not self.random_access:
            return None
        return max(0, self.num_epochs * self.batches_per_epoch - self.start)

    def __getitem__(self, index):
        total = self.num_batches
        if total is not None and not 0 <= index < total:
            raise IndexError(f"batch {index} out of range for {total} batches.")
        return self.batch(self.start + int(index))

    # === Iteration with background prefetch ===

    def __iter__(self):
        """Yields batches from the current position on, prefetched by `workers` threads."""
        pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="data")
        pending = []
        indices = itertools.count(self._position)
        total = self.num_batches
        try:
            while True:
                while len(pending) < self.max_queue_size:
                    index = next(indices)
                    if total is not None and index - self.start >= total:
                        break
                    pending.append(pool.submit(self.batch, index))
                if not pending:
                    return
                try:
                    batch = pending.pop(0).result()
                except IndexError:  # a streaming source ran out of data
                    return
                self._position += 1
                yield batch
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=False)

    # === Position ===

    def state(self, next_batch=None):
        """The data-iterator position: a small JSON-able dict for the checkpoint.

        Args:
            next_batch: the global index of the next batch to train on. After
                `model.fit` on this loader it is `loader.start + steps trained`;
                default: the position of Python iteration over the loader.
        """
        return {
            "version": STATE_VERSION,
            "next_batch": int(self._position if next_batch is None else next_batch),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
        }

    def restore(self, state, check=True):
        """Continues from `state()`'s dict: `loader[0]` becomes its next batch. Returns self."""
        if check:
            for key in ("seed", "batch_size", "shuffle", "num_samples"):
                if key in state and state[key] != getattr(self, key):
                    raise ValueError(
                        f"the saved data position was made with {key}={state[key]!r} but this "
                        f"loader has {key}={getattr(self, key)!r}: the batches would differ."
                    )
        next_batch = int(state["next_batch"])
        if next_batch < 0:
            raise ValueError(f"the data position must be >= 0, got {next_batch}.")
        self.start = self._position = next_batch
        return self
