"""Gemma's gated-GELU feed-forward."""

import keras
from keras import ops

from keras_openpi.layers.call_levers import CallLeversMixin
from keras_openpi.layers.lora_dense import LoRADense


@keras.saving.register_keras_serializable(package="keras_openpi")
class GatedFeedForward(CallLeversMixin, keras.layers.Layer):
    """`down(gelu_tanh(gate(x)) * up(x))`, without biases.

    Args:
        hidden_dim: the inner width (openpi's `mlp_dim`).
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> ffw = GatedFeedForward(hidden_dim=128)
    >>> ffw(keras.ops.ones((2, 5, 64))).shape
    (2, 5, 64)
    """

    def __init__(self, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim

    def build(self, input_shape):
        width = input_shape[-1]

        def dense(units, name):
            return LoRADense(
                units,
                use_bias=False,
                kernel_initializer="lecun_normal",
                dtype=self.dtype_policy,
                name=name,
            )

        # === Layers ===
        self.gate = dense(self.hidden_dim, "gate")
        self.up = dense(self.hidden_dim, "up")
        self.down = dense(width, "down")
        self.gate.build((None, None, width))
        self.up.build((None, None, width))
        self.down.build((None, None, self.hidden_dim))
        self.built = True

    def call(self, x):
        return self.run_forward(x)

    def forward(self, x):
        hidden = ops.gelu(self.gate(x), approximate=True) * self.up(x)
        return self.down(hidden)

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim}
