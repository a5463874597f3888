"""openpi's norm stats estimator, reproduced number for number (`--quantiles openpi`).

openpi (`openpi/shared/normalize.py`, `RunningStats`) keeps, per dimension,
a running mean and mean of squares in the dtype of the data (float32 for
openpi's loader) and a 5000-bin histogram:

- the first batch fixes the bin edges to `linspace(min - 1e-10, max + 1e-10, 5001)`;
- whenever a later batch extends any dimension's range, every dimension is
  re-binned onto `linspace(min, max, 5001)`: each old bin's count moves to the
  new bin holding the old bin's *left edge* (counts whose left edge falls
  outside the new range are dropped, as numpy's histogram drops them);
- a quantile `q` is the left edge of the first bin whose cumulative count
  reaches `q * count` (the right end of the range if none does).

So openpi's q01/q99 lie on its bin edges, are biased towards the left edge of
a bin (on `arange(12).reshape(4, 3)` q99 is 8.998 where `np.quantile` gives
8.91), and depend on how the data was split into batches. This module
computes exactly those numbers from the same batches, so that stats computed
here equal the `norm_stats.json` openpi's `compute_norm_stats.py` writes.
`keras_openpi.data.running_stats.RunningStats` (the default) is the accurate one.
"""

import numpy as np

from keras_openpi.data.finite import finite_vectors
from keras_openpi.data.normalize import NormStats

NUM_BINS = 5000
# openpi widens the first batch's range by this much on each side.
EDGE_MARGIN = 1e-10


def _edges(low, high):
    """openpi's bin edges of one dimension (float64, as numpy < 2 promotes them)."""
    return np.linspace(float(low), float(high), NUM_BINS + 1)


def _bin_counts(values, edges, weights=None):
    """numpy's `histogram(values, bins=edges, weights=weights)` counts, as float64.

    A value lies in bin i when `edges[i] <= value < edges[i + 1]`, the last bin
    also holding `value == edges[-1]`; values outside `[edges[0], edges[-1]]`
    are not counted.
    """
    index = np.searchsorted(edges, values.astype(np.float64), side="right") - 1
    index[(index == NUM_BINS) & (values == edges[-1])] = NUM_BINS - 1
    inside = (index >= 0) & (index < NUM_BINS)
    weights = None if weights is None else weights[inside]
    return np.bincount(index[inside], weights=weights, minlength=NUM_BINS).astype(np.float64)


class OpenpiRunningStats:
    """openpi's `RunningStats`: mean, std, q01 and q99 exactly as openpi computes them.

    Feed it the batches openpi's loader gives (float32 arrays of
    `batch_size` samples, in the dataset's order) to get openpi's numbers;
    `compute_norm_stats(..., quantiles="openpi")` does that. The statistics
    are openpi's throughout: the mean and the mean of squares are running
    averages in the data's dtype and the std is `sqrt(max(0, E[x²] - E[x]²))`.

    Example:
    >>> stats = OpenpiRunningStats()
    >>> stats.update(np.arange(12).reshape(4, 3))
    >>> stats.get_statistics().q99.round(4)
    array([ 8.9982,  9.9982, 10.9982])
    """

    def __init__(self):
        self.count = 0
        self._dim = None

    def update(self, batch):
        """Adds the vectors of `batch` (..., d): every leading axis is a batch axis."""
        batch = np.asarray(batch)
        if batch.ndim == 0 or batch.dtype.kind not in "biuf":
            raise ValueError(
                "OpenpiRunningStats.update needs a numeric array of shape (..., d), got "
                f"dtype {batch.dtype} and shape {batch.shape}."
            )
        batch = finite_vectors(batch, "OpenpiRunningStats.update")
        if batch.shape[0] == 0:
            return
        if self._dim is None:
            self._start(batch)
        elif batch.shape[1] != self._dim:
            raise ValueError(
                f"OpenpiRunningStats got vectors of {batch.shape[1]} dims after vectors of "
                f"{self._dim}."
            )
        else:
            self._extend_range(batch)
        n = batch.shape[0]
        self.count += n
        # openpi's running averages, in the data's dtype (a no-op on the first batch).
        self._mean += (np.mean(batch, axis=0) - self._mean) * (n / self.count)
        self._mean_sq += (np.mean(batch**2, axis=0) - self._mean_sq) * (n / self.count)
        for i in range(self._dim):
            self._hist[i] += _bin_counts(batch[:, i], self._bin_edges[i])

    def _start(self, batch):
        self._dim = batch.shape[1]
        self._mean = np.mean(batch, axis=0)
        self._mean_sq = np.mean(batch**2, axis=0)
        self._min = np.min(batch, axis=0)
        self._max = np.max(batch, axis=0)
        self._hist = np.zeros((self._dim, NUM_BINS))
        self._bin_edges = np.stack(
            [
                _edges(float(low) - EDGE_MARGIN, float(high) + EDGE_MARGIN)
                for low, high in zip(self._min, self._max)
            ]
        )

    def _extend_range(self, batch):
        """openpi re-bins every dimension when any dimension's range grows."""
        new_min, new_max = np.min(batch, axis=0), np.max(batch, axis=0)
        grown = np.any(new_max > self._max) or np.any(new_min < self._min)
        self._max = np.maximum(self._max, new_max)
        self._min = np.minimum(self._min, new_min)
        if not grown:
            return
        for i in range(self._dim):
            edges = _edges(self._min[i], self._max[i])
            self._hist[i] = _bin_counts(self._bin_edges[i, :-1], edges, weights=self._hist[i])
            self._bin_edges[i] = edges

    def _quantile(self, q):
        """The left edge of the first bin whose cumulative count reaches `q * count`."""
        cumulative = np.cumsum(self._hist, axis=1)
        index = (cumulative < q * self.count).sum(axis=1)
        return self._bin_edges[np.arange(self._dim), index]

    def get_statistics(self):
        """The `NormStats` of everything seen so far (needs at least 2 vectors)."""
        if self.count < 2:
            raise ValueError(
                f"OpenpiRunningStats needs at least 2 vectors to compute statistics, got "
                f"{self.count}."
            )
        std = np.sqrt(np.maximum(0, self._mean_sq - self._mean**2))
        return NormStats(
            mean=self._mean, std=std, q01=self._quantile(0.01), q99=self._quantile(0.99)
        )
