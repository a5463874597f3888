"""Normalization statistics: computing them, (un)normalizing with them, openpi's file.

`NormStats` holds per-dimension `mean`, `std`, `q01`, `q99` of one key
(`state`, `actions`). `RunningStats` computes them in one streaming pass, and
`compute_norm_stats` runs it over any iterable of samples. Files use openpi's
`norm_stats.json` layout, so openpi's released stats load as they are:

    {"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...]},
                    "actions": {...}}}
"""

import dataclasses
import json
import math
import os
import pathlib
import warnings
from collections.abc import Mapping

import numpy as np

from keras_openpi.data.finite import first_non_finite

FILE_NAME = "norm_stats.json"
# A dimension whose std or q99 - q01 is below this is reported as near-constant:
# openpi's 1e-6 guard then dominates and the normalized values explode.
NEAR_ZERO_RANGE = 1e-4


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one key (float64 vectors of one length).

    Args:
        mean: (d,) mean.
        std: (d,) standard deviation.
        q01: (d,) 1st percentile, or None.
        q99: (d,) 99th percentile, or None.
    """

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    def __post_init__(self):
        width = None
        for field in ("mean", "std", "q01", "q99"):
            value = getattr(self, field)
            if value is None:
                if field in ("mean", "std"):
                    raise ValueError(f"NormStats needs {field!r}, got None.")
                continue
            value = np.asarray(value, dtype=np.float64)
            if value.ndim != 1 or (width is not None and value.shape[0] != width):
                raise ValueError(
                    f"NormStats {field!r} must be a vector of the same length as 'mean' "
                    f"({width if width is not None else 'd'}), got shape {value.shape}."
                )
            width = value.shape[0]
            bad = first_non_finite(value)
            if bad is not None:
                raise ValueError(
                    f"NormStats {field!r} holds {bad[1]} at dimension {bad[0][0]}: norm stats "
                    "must be finite (NaN or infinite values make every normalized value NaN)."
                )
            object.__setattr__(self, field, value)
        negative = np.flatnonzero(self.std < 0)
        if negative.size:
            i = int(negative[0])
            raise ValueError(f"NormStats 'std' must be >= 0, got {self.std[i]} at dimension {i}.")
        if self.q01 is not None and self.q99 is not None:
            inverted = np.flatnonzero(self.q01 > self.q99)
            if inverted.size:
                i = int(inverted[0])
                raise ValueError(
                    f"NormStats 'q01' must not exceed 'q99', got {self.q01[i]} > {self.q99[i]} "
                    f"at dimension {i}."
                )

    @property
    def dim(self):
        return self.mean.shape[0]


# === (Un)normalizing ===


def _stats_vector(stats, field, width, key, pad=None):
    value = getattr(stats, field)
    if value.shape[0] >= width:
        return value[:width]
    if pad is None:
        raise ValueError(
            f"{key!r} has {width} dims but its norm stats have {value.shape[0]}: the stats "
            "do not match the data (recompute them with `keras-openpi norm-stats`)."
        )
    return np.concatenate([value, np.full(width - value.shape[0], pad)])


def normalize(x, stats, use_quantiles=False, key="value"):
    """openpi's normalization of `x` (..., d) with `stats` truncated to d dims.

    z-score `(x - mean) / (std + 1e-6)`; quantile `(x - q01) / (q99 - q01 + 1e-6) * 2 - 1`.
    Returns float64, as openpi's float64 stats promote it to.
    """
    x = np.asarray(x)
    width = x.shape[-1]
    values = x.astype(np.float64)
    if use_quantiles:
        q01 = _stats_vector(stats, "q01", width, key)
        q99 = _stats_vector(stats, "q99", width, key)
        out = (values - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
    else:
        mean = _stats_vector(stats, "mean", width, key)
        std = _stats_vector(stats, "std", width, key)
        out = (values - mean) / (std + 1e-6)
    return out


def unnormalize(x, stats, use_quantiles=False, key="value"):
    """Inverse of `normalize` for `x` (..., d) at least as wide as the stats.

    z-score `x * (std + 1e-6) + mean` with stats padded by mean 0 and std 1;
    quantile `(x + 1) / 2 * (q99 - q01 + 1e-6) + q01` on the stats' dims,
    later dims (the model's padding) unchanged.
    """
    x = np.asarray(x)
    width = x.shape[-1]
    values = x.astype(np.float64)
    if width < stats.dim:
        raise ValueError(
            f"{key!r} has {width} dims but its norm stats have {stats.dim}: the stats do "
            "not match the model's outputs."
        )
    if use_quantiles:
        dim = stats.dim
        head = (values[..., :dim] + 1.0) / 2.0 * (stats.q99 - stats.q01 + 1e-6) + stats.q01
        out = np.concatenate([head, values[..., dim:]], axis=-1)
    else:
        mean = _stats_vector(stats, "mean", width, key, pad=0.0)
        std = _stats_vector(stats, "std", width, key, pad=1.0)
        out = values * (std + 1e-6) + mean
    return out


def near_zero_dims(stats, use_quantiles=None, threshold=NEAR_ZERO_RANGE):
    """Dimensions whose spread is below `threshold`.

    Args:
        stats: a NormStats.
        use_quantiles: check `q99 - q01` (True), `std` (False), or both (None).
        threshold: the spread below which a dimension counts as near-constant.

    Returns:
        list of `(dim, std, q99 - q01 or None)`.
    """
    spread = None
    if stats.q01 is not None and stats.q99 is not None:
        spread = stats.q99 - stats.q01
    small = np.zeros(stats.dim, dtype=bool)
    if use_quantiles is not True:
        small |= stats.std < threshold
    if use_quantiles is not False and spread is not None:
        small |= spread < threshold
    return [
        (int(i), float(stats.std[i]), None if spread is None else float(spread[i]))
        for i in np.flatnonzero(small)
    ]


def warn_near_zero_range(norm_stats, use_quantiles=None, threshold=NEAR_ZERO_RANGE):
    """Warns once per near-constant dimension, naming the key and the dimension."""
    for key, stats in norm_stats.items():
        for dim, std, spread in near_zero_dims(stats, use_quantiles, threshold):
            spread_text = "" if spread is None else f", q99 - q01 = {spread:.3g}"
            affected = "z-score and quantile" if std < threshold else "quantile (π0.5, π0-FAST)"
            warnings.warn(
                f"norm stats {key!r} dimension {dim} has a near-zero range (std = {std:.3g}"
                f"{spread_text}): {affected} normalization divides by about 1e-6 there, so "
                "any deviation from the constant is hugely amplified. Check that the "
                "dimension is used.",
                UserWarning,
                stacklevel=2,
            )


# === Computing ===


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
        batch = batch.reshape(-1, batch.shape[-1])
        if batch.shape[0] == 0:
            return
        bad = first_non_finite(batch)
        if bad is not None:
            raise ValueError(
                f"RunningStats.update got {bad[1]} (vector {bad[0][0]}, dimension {bad[0][1]}): "
                "norm stats need finite values (NaN or infinite values make every statistic NaN)."
            )
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
    from keras_openpi.data.openpi_running_stats import OpenpiRunningStats

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


# === openpi's norm_stats.json ===


def _vector(value):
    return None if value is None else [float(v) for v in value]


def norm_stats_to_json(norm_stats):
    """openpi's `norm_stats.json` text (2-space indent, null for missing quantiles)."""
    payload = {}
    for key, stats in norm_stats.items():
        fields = {name: _vector(getattr(stats, name)) for name in ("mean", "std", "q01", "q99")}
        for name, values in fields.items():
            if values is not None and not all(math.isfinite(v) for v in values):
                raise ValueError(f"norm stats {key!r} {name!r} has NaN or infinite values.")
        payload[key] = fields
    return json.dumps({"norm_stats": payload}, indent=2)


def norm_stats_from_json(text, source="norm stats"):
    """Parses openpi's `norm_stats.json` text into `{key: NormStats}`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("norm_stats"), Mapping):
        raise ValueError(
            f'{source} must hold {{"norm_stats": {{key: {{"mean", "std", "q01", "q99"}}}}}}, '
            f"got {sorted(data) if isinstance(data, Mapping) else type(data).__name__}."
        )
    out = {}
    for key, fields in data["norm_stats"].items():
        if not isinstance(fields, Mapping) or "mean" not in fields or "std" not in fields:
            raise ValueError(f"{source}: entry {key!r} needs 'mean' and 'std', got {fields!r:.80}.")
        try:
            out[key] = NormStats(
                mean=fields["mean"],
                std=fields["std"],
                q01=fields.get("q01"),
                q99=fields.get("q99"),
            )
        except ValueError as error:
            raise ValueError(f"{source}: entry {key!r}: {error}") from None
    return out


def _stats_file(path):
    path = pathlib.Path(path)
    return path / FILE_NAME if path.is_dir() or not path.suffix else path


def save_norm_stats(path, norm_stats):
    """Writes `norm_stats` to `path` (a `.json` file, or a directory that gets `norm_stats.json`).

    The file is written next to its target and renamed, so that an
    interrupted save leaves any previous file intact.

    Returns:
        the path of the written file.
    """
    target = _stats_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(norm_stats_to_json(norm_stats))
    os.replace(partial, target)
    return target


def load_norm_stats(path):
    """Reads `{key: NormStats}` from a `norm_stats.json` file or a directory holding one."""
    target = _stats_file(path)
    if not target.is_file():
        raise FileNotFoundError(f"no norm stats file at {target}.")
    return norm_stats_from_json(target.read_text(), source=str(target))
