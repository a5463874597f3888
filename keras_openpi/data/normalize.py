"""Normalization statistics: (un)normalizing with them, openpi's file.

`NormStats` holds per-dimension `mean`, `std`, `q01`, `q99` of one key
(`state`, `actions`); `keras_openpi.data.running_stats` computes them. Files
use openpi's `norm_stats.json` layout, so openpi's released stats load as
they are:

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
