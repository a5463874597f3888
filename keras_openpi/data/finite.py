"""Finding NaN and inf in data, so that an error can say where the first one is."""

import numpy as np


def first_non_finite(values):
    """The first NaN or inf of a float array, in row-major order.

    A min and a max (which NaN propagates through) answer the common case
    without a temporary array; the position is only searched for when
    there is something to find.

    Args:
        values: an array (any shape); arrays that are not floating point have none.

    Returns:
        `(index tuple, value)`, or None when every value is finite.

    Example:
    >>> first_non_finite(np.array([[0.0, 1.0], [np.inf, np.nan]]))
    ((1, 0), np.float64(inf))
    """
    values = np.asarray(values)
    if values.size == 0 or values.dtype.kind != "f":
        return None
    if np.isfinite(values.min()) and np.isfinite(values.max()):
        return None
    flat = int(np.argmin(np.isfinite(values).ravel()))
    index = tuple(int(i) for i in np.unravel_index(flat, values.shape))
    return index, values[index]


def finite_vectors(batch, owner):
    """`batch` (..., d) as vectors (N, d), every leading axis a batch axis; refuses NaN and inf.

    Args:
        batch: a numeric array of rank >= 1.
        owner: who asks, for the error (`RunningStats.update`).

    Raises:
        ValueError: a NaN or inf, naming its vector and dimension.
    """
    batch = batch.reshape(-1, batch.shape[-1])
    bad = first_non_finite(batch)
    if bad is not None:
        raise ValueError(
            f"{owner} got {bad[1]} (vector {bad[0][0]}, dimension {bad[0][1]}): norm stats need "
            "finite values (NaN or infinite values make every statistic NaN)."
        )
    return batch


def within_frame(index):
    """` at dimension 2` / ` at index (1, 2)` / `` for what follows the frame in a frame's index."""
    if len(index) == 1:
        return f" at dimension {index[0]}"
    return f" at index {tuple(index)}" if index else ""


def count_non_finite_rows(values):
    """How many rows (first axis) of `values` hold a NaN or inf."""
    values = np.asarray(values)
    rows = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    return int(len(values) - np.count_nonzero(rows))
