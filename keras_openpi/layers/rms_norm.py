"""Gemma RMS normalization, plain and adaptive (adaRMS)."""

import keras
from keras import ops

EPSILON = 1e-6


def _normalize(x):
    """`x / sqrt(mean(x**2) + eps)` with the variance in float32; returns float32."""
    x32 = ops.cast(x, "float32")
    variance = ops.mean(ops.square(x32), axis=-1, keepdims=True)
    return x32 * ops.rsqrt(variance + EPSILON)


@keras.saving.register_keras_serializable(package="keras_openpi")
class RMSNorm(keras.layers.Layer):
    """Gemma's RMS norm: `normalize(x) * (1 + scale)`, computed in float32.

    The `scale` weight starts at zero, so a fresh layer is a pure normalization.
    The result is cast back to the input's dtype.

    Args:
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> norm = RMSNorm()
    >>> norm(keras.ops.ones((2, 5, 8))).shape
    (2, 5, 8)
    """

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )
        self.built = True

    def call(self, x):
        normed = _normalize(x) * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(normed, x.dtype)


@keras.saving.register_keras_serializable(package="keras_openpi")
class AdaptiveRMSNorm(keras.layers.Layer):
    """adaRMS (π0.5): scale, shift and a residual gate predicted from a condition.

    `modulation = Dense(3 * D)(cond)` (zero-initialized) is split into `scale`,
    `shift` and `gate`; the output is `normalize(x) * (1 + scale) + shift` and the
    gate multiplies the residual branch that follows (see `DecoderBlock`).

    Args:
        cond_dim: width of the conditioning vector.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: (B, T, D) activations.
        cond: (B, C) conditioning vector (π0.5: the flow-matching time).

    Returns:
        `(normed, gate)`, shapes (B, T, D) and (B, 1, D).

    Example:
    >>> norm = AdaptiveRMSNorm(cond_dim=4)
    >>> y, gate = norm(keras.ops.ones((2, 5, 8)), keras.ops.ones((2, 4)))
    >>> y.shape, gate.shape
    ((2, 5, 8), (2, 1, 8))
    """

    def __init__(self, cond_dim, **kwargs):
        super().__init__(**kwargs)
        self.cond_dim = cond_dim
        self.modulation = None

    def build(self, input_shape):
        width = input_shape[-1]
        self.modulation = keras.layers.Dense(
            3 * width,
            kernel_initializer="zeros",
            dtype=self.dtype_policy,
            name="modulation",
        )
        self.modulation.build((None, self.cond_dim))
        self.built = True

    def call(self, x, cond):
        modulation = ops.cast(self.modulation(cond), "float32")[:, None, :]
        scale, shift, gate = ops.split(modulation, 3, axis=-1)
        normed = _normalize(x) * (1.0 + scale) + shift
        return ops.cast(normed, x.dtype), ops.cast(gate, x.dtype)

    def get_config(self):
        return {**super().get_config(), "cond_dim": self.cond_dim}
