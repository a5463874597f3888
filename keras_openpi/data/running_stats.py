"""Computing norm stats: `RunningStats` in one streaming pass, `compute_norm_stats` over samples.

`compute_norm_stats` runs `RunningStats` (exact mean and std, quantiles
within one fine histogram bin) or openpi's own estimate (`OpenpiRunningStats`)
over any iterable of samples and returns `{key: NormStats}`.
"""

import math
import warnings

import numpy as np

from keras_openpi.data.finite import finite_vectors
from keras_openpi.data.finite import first_non_finite
from keras_openpi.data.normalize import NormStats
from keras_openpi.data.normalize import warn_near_zero_range
from keras_openpi.data.openpi_running_stats import OpenpiRunningStats


class RunningStats:
    """Mean, std, q01 and q99 of a stream of vectors, in one pass.

    The mean and std are exact (Chan's parallel update in float64). The
    quantiles come from a per-dimension histogram, as in openpi: the
    histogram's window grows with the data by merging whole bins (widths
    doubling, edges kept on the old grid), so that no count is ever moved
    between bins, and the window stays within about twice the data's range.
    Quantiles follow numpy's 'linear' method between order statistics that
    are located within their bins and clipped to `[min, max]`: they are
    within one bin (`bin_width`) of `np.quantile`.

    Args:
        num_bins: histogram bins per dimension.

    Example:
    >>> stats = RunningStats()
    >>> stats.update(np.arange(12.0).reshape(4, 3))
    >>> stats.get_statistics().mean
    array([4.5, 5.5, 6.5])
    """

    def __init__(self, num_bins=10_000):
        self.num_bins = int(num_bins)
        self.count = 0
        self._dim = None

    def update(self, batch):
        """Adds the vectors of `batch` (..., d): every leading axis is a batch axis."""
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim == 0:
            raise ValueError("RunningStats.update needs an array of shape (..., d), got a scalar.")
        batch = finite_vectors(batch, "RunningStats.update")
        if batch.shape[0] == 0:
            return
        if self._dim is None:
            self._start(batch)
        elif batch.shape[1] != self._dim:
            raise ValueError(
                f"RunningStats got vectors of {batch.shape[1]} dims after vectors of {self._dim}."
            )
        else:
            self._merge_moments(batch)
        self._count_into_histogram(batch)

    def _start(self, batch):
        n, self._dim = batch.shape
        self.count = n
        self._mean = batch.mean(axis=0)
        self._m2 = ((batch - self._mean) ** 2).sum(axis=0)
        self._min = batch.min(axis=0)
        self._max = batch.max(axis=0)
        scale = np.maximum(1.0, np.maximum(np.abs(self._min), np.abs(self._max)))
        span = np.maximum(self._max - self._min, scale * 1e-9)
        self._low = self._min.copy()
        self._width = span / self.num_bins
        self._hist = np.zeros((self._dim, self.num_bins), dtype=np.int64)

    def _merge_moments(self, batch):
        n = batch.shape[0]
        mean = batch.mean(axis=0)
        m2 = ((batch - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total
        self._min = np.minimum(self._min, batch.min(axis=0))
        self._max = np.maximum(self._max, batch.max(axis=0))

    def _count_into_histogram(self, batch):
        outside = (self._min < self._low) | (self._max > self._low + self._width * self.num_bins)
        for dim in np.flatnonzero(outside):
            self._grow_window(dim)
        index = np.floor((batch - self._low) / self._width).astype(np.int64)
        index = np.clip(index, 0, self.num_bins - 1) + np.arange(self._dim) * self.num_bins
        counts = np.bincount(index.ravel(), minlength=self._dim * self.num_bins)
        self._hist += counts.reshape(self._dim, self.num_bins)

    def _grow_window(self, dim):
        """Re-windows one dimension to cover [min, max]: shift by whole bins, merge 2**k bins."""
        low, width, bins = self._low[dim], self._width[dim], self.num_bins
        shift = math.floor((self._min[dim] - low) / width)  # new low = low + shift * width
        new_low = low + shift * width
        needed = (self._max[dim] - new_low) / (width * bins)
        merge = max(0, math.ceil(math.log2(needed))) if needed > 1 else 0
        while new_low + width * 2**merge * bins < self._max[dim]:
            merge += 1
        occupied = np.flatnonzero(self._hist[dim])
        target = (occupied - shift) >> min(merge, 63)  # int64: a shift of 63 already gives 0
        hist = np.zeros(bins, dtype=np.int64)
        np.add.at(hist, np.clip(target, 0, bins - 1), self._hist[dim, occupied])
        self._hist[dim] = hist
        self._low[dim] = new_low
        self._width[dim] = width * 2**merge

    @property
    def bin_width(self):
        """(d,) current histogram bin width: the quantiles' resolution."""
        return self._width.copy()

    def _order_statistic(self, k):
        """(d,) estimate of the k-th smallest value (0-based), spread evenly within its bin."""
        cumulative = np.cumsum(self._hist, axis=1)
        rows = np.arange(self._dim)
        bin_index = np.minimum((cumulative <= k).sum(axis=1), self.num_bins - 1)
        below = np.where(bin_index > 0, cumulative[rows, bin_index - 1], 0)
        inside = np.maximum(self._hist[rows, bin_index], 1)
        return self._low + (bin_index + (k - below + 0.5) / inside) * self._width

    def _quantile(self, q):
        """numpy's 'linear' quantile, interpolating between estimated order statistics."""
        position = q * (self.count - 1)
        lower = math.floor(position)
        upper = min(lower + 1, self.count - 1)
        low_value = self._order_statistic(lower)
        value = low_value + (position - lower) * (self._order_statistic(upper) - low_value)
        return np.clip(value, self._min, self._max)

    def get_statistics(self):
        """The `NormStats` of everything seen so far (needs at least 2 vectors)."""
        if self.count < 2:
            raise ValueError(
                f"RunningStats needs at least 2 vectors to compute statistics, got {self.count}."
            )
        std = np.sqrt(np.maximum(self._m2 / self.count, 0.0))
        return NormStats(
            mean=self._mean.copy(), std=std, q01=self._quantile(0.01), q99=self._quantile(0.99)
        )


def _sample_origin(sample, number, value, index):
    """`sample 3 (episode 1, frame 7)`: where a sample, or a row of a batch, came from.

    A batch (samples stacked by a loader) has 1-D `episode_index` /
    `frame_index` as long as `value`'s first axis; `index[0]` is then the row.
    """
    origin, parts = f"sample {number}", []
    for key, name in (("episode_index", "episode"), ("frame_index", "frame")):
        where = np.asarray(sample.get(key, []))
        if where.ndim == 1 and value.ndim > 1 and len(where) == value.shape[0]:
            origin, where = f"sample {number} row {index[0]}", where[index[0]]
        if where.ndim == 0 and where.dtype.kind in "iu":
            parts.append(f"{name} {int(where)}")
    return origin + (f" ({', '.join(parts)})" if parts else "")


QUANTILE_METHODS = ("exact", "openpi")
# openpi's TrainConfig.batch_size: the batches its compute_norm_stats.py updates with.
OPENPI_BATCH_SIZE = 32


def _openpi_loader_dtype(value):
    """The dtype openpi's JAX loader gives `value` (64-bit types become 32-bit, as without x64)."""
    narrow = {"f": np.float32, "i": np.int32, "u": np.uint32}
    if value.dtype.itemsize == 8 and value.dtype.kind in narrow:
        return value.astype(narrow[value.dtype.kind])
    return value


def compute_norm_stats(
    samples,
    keys=("state", "actions"),
    max_samples=None,
    chunk_size=8192,
    quantiles="exact",
    batch_size=OPENPI_BATCH_SIZE,
):
    """Norm stats of `keys` over an iterable of samples.

    The data source interface: any iterable of mappings (a dataset, a
    generator) whose items hold each of `keys` as an array (..., d); every
    leading axis counts as vectors (an action chunk (H, d) adds H vectors, as
    in openpi). Warns about near-constant dimensions.

    `quantiles="openpi"` reproduces openpi's `compute_norm_stats.py` number
    for number (`OpenpiRunningStats`): the samples go in as openpi's loader
    gives them (float32, `batch_size` samples per update, in order) and the
    samples past the last full batch are left out, as openpi's loader leaves
    them out (with a warning saying how many).

    Args:
        samples: iterable of sample dicts.
        keys: the keys to describe.
        max_samples: stop after this many samples (None: all).
        chunk_size: vectors buffered per histogram update (`"exact"`).
        quantiles: `"exact"` (`RunningStats`: within one fine bin of
            `np.quantile`) or `"openpi"` (openpi's histogram estimate).
        batch_size: the samples per update of `"openpi"`: the `batch_size`
            of the openpi config whose stats are reproduced.

    Returns:
        `{key: NormStats}`.

    Raises:
        ValueError: a sample lacks a key or holds NaN/inf, there are no
            samples, or (`"openpi"`) fewer than `batch_size`.

    Example:
    >>> data = [{"state": np.array([i, -i]), "actions": np.ones((4, 2)) * i} for i in range(10)]
    >>> compute_norm_stats(data)["actions"].mean
    array([4.5, 4.5])
    """
    if quantiles not in QUANTILE_METHODS:
        raise ValueError(f"'quantiles' must be one of {QUANTILE_METHODS}, got {quantiles!r}.")
    openpi = quantiles == "openpi"
    whole = isinstance(batch_size, int) and not isinstance(batch_size, bool)
    if openpi and not (whole and batch_size >= 1):
        raise ValueError(f"'batch_size' must be a positive integer, got {batch_size!r}.")
    running = {key: OpenpiRunningStats() if openpi else RunningStats() for key in keys}
    buffers = {key: [] for key in keys}
    buffered = dict.fromkeys(keys, 0)
    seen = 0
    for sample in samples:
        if max_samples is not None and seen >= max_samples:
            break
        for key in keys:
            if key not in sample:
                raise ValueError(
                    f"sample {seen} has no {key!r} to compute norm stats of; "
                    f"it has {sorted(sample)}."
                )
            value = np.asarray(sample[key])
            if value.ndim == 0 or value.dtype.kind not in "biuf":
                raise ValueError(
                    f"sample {seen}: {key!r} must be a numeric array of shape (..., d), got "
                    f"dtype {value.dtype} and shape {value.shape}."
                )
            bad = first_non_finite(value)
            if bad is not None:
                raise ValueError(
                    f"{_sample_origin(sample, seen, value, bad[0])}: "
                    f"{key!r} holds {bad[1]} at index {bad[0]}; norm stats need finite values "
                    "(fix the data, or leave those frames out)."
                )
            if openpi:
                buffers[key].append(_openpi_loader_dtype(value).reshape(-1, value.shape[-1]))
                if len(buffers[key]) == batch_size:
                    running[key].update(np.concatenate(buffers[key]))
                    buffers[key] = []
                continue
            buffers[key].append(value.astype(np.float64).reshape(-1, value.shape[-1]))
            buffered[key] += buffers[key][-1].shape[0]
            if buffered[key] >= chunk_size:
                running[key].update(np.concatenate(buffers[key]))
                buffers[key], buffered[key] = [], 0
        seen += 1
    if seen == 0:
        raise ValueError("the data source gave no samples to compute norm stats of.")
    if openpi:
        if seen < batch_size:
            raise ValueError(
                f"openpi's quantiles use whole batches of {batch_size} samples, but the data "
                f"source gave {seen} (lower the batch size)."
            )
        if seen % batch_size:
            warnings.warn(
                f"openpi quantiles: the last {seen % batch_size} of {seen} samples (past the "
                f"last full batch of {batch_size}) are left out, as openpi's loader leaves "
                "them out.",
                UserWarning,
                stacklevel=2,
            )
    else:
        for key in keys:
            if buffers[key]:
                running[key].update(np.concatenate(buffers[key]))
    stats = {key: running[key].get_statistics() for key in keys}
    warn_near_zero_range(stats)
    return stats
