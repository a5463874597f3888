"""Rotary position embedding, split-half form (as in Gemma and openpi)."""

from keras import ops


def apply_rotary_embedding(x, positions, max_wavelength=10_000):
    """Rotates the two halves of each head vector by position-dependent angles.

    The angles are `position / max_wavelength ** (2 i / H)` for `i < H / 2`; the
    first half of the head dimension is rotated against the second half (not
    interleaved pairs). Computed in float32, returned in `x`'s dtype.

    Args:
        x: (B, T, N, H) queries or keys.
        positions: (B, T) integer positions.
        max_wavelength: the longest wavelength.

    Returns:
        (B, T, N, H), the rotated `x`.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    freq_exponents = (2.0 / head_dim) * ops.arange(half, dtype="float32")
    timescale = ops.power(float(max_wavelength), freq_exponents)
    radians = ops.cast(positions, "float32")[..., None] / timescale  # (B, T, H/2)
    radians = radians[..., None, :]  # (B, T, 1, H/2)
    sin, cos = ops.sin(radians), ops.cos(radians)
    x32 = ops.cast(x, "float32")
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return ops.cast(rotated, x.dtype)
