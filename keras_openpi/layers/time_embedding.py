"""Sinusoidal embedding of the flow-matching time."""

import math

from keras import ops


def sinusoidal_time_embedding(time, dim, min_period=4e-3, max_period=4.0):
    """Embeds scalar times as `[sin(2 pi t / p), cos(2 pi t / p)]` over periods p.

    The `dim / 2` periods are spaced geometrically from `min_period` to
    `max_period` (π0's sensitivity range for t in [0, 1]).

    Args:
        time: (B,) float times.
        dim: embedding width, even.
        min_period: shortest period.
        max_period: longest period.

    Returns:
        (B, dim) float32, sines first.
    """
    if dim % 2:
        raise ValueError(f"The time embedding width must be even, got {dim}.")
    fraction = ops.linspace(0.0, 1.0, dim // 2, dtype="float32")
    period = min_period * (max_period / min_period) ** fraction
    angle = ops.cast(time, "float32")[:, None] * (1.0 / period * 2.0 * math.pi)[None, :]
    return ops.concatenate([ops.sin(angle), ops.cos(angle)], axis=-1)
