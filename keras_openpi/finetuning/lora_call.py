"""LoRA computed on the activations, `x @ W + scale * (x @ A) @ B`, as openpi does."""

import keras
from keras import ops


def use_low_rank_call(layer):
    """Makes an adapted float `Dense` / `EinsumDense` apply its adapters to the activations.

    Keras' LoRA layers read `kernel`, which is `W + scale * A @ B`: every call
    forms the merged kernel (a full-size copy of each frozen matrix) and the
    backward pass forms its full-size gradient, one extra matrix product as
    large as the layer's own, only to project it onto A and B. Computing
    `x @ W + scale * (x @ A) @ B` instead (openpi's `lora.Einsum`) gives the
    same outputs and gradients without either. Keras' int8 layers already
    compute LoRA this way; they, and einsum equations whose kernel's last axis
    is not the output's last axis, keep Keras' call.

    Args:
        layer: a `Dense` or `EinsumDense` with LoRA enabled.

    Example:
    >>> layer = keras.layers.Dense(8)
    >>> layer.build((None, 4))
    >>> layer.enable_lora(2)
    >>> use_low_rank_call(layer)
    >>> layer(keras.ops.ones((3, 4))).shape
    (3, 8)
    """
    if layer.quantization_mode is not None:
        return
    if isinstance(layer, keras.layers.EinsumDense):
        equation = layer.equation
        kernel_axes, output_axes = equation.split(",")[1].split("->")
        if kernel_axes[-1] != output_axes[-1]:
            return

        def multiply(x, kernel):
            return ops.einsum(equation, x, kernel)

    elif isinstance(layer, keras.layers.Dense):
        multiply = ops.matmul
    else:
        raise ValueError(f"{layer.path!r} is a {type(layer).__name__}, not a Dense or EinsumDense.")

    def product(x, kernel):
        # A bfloat16 frozen kernel meets float32 activations: PyTorch does not promote.
        return multiply(x, ops.cast(kernel, x.dtype))

    def call(inputs, training=None):
        x = product(inputs, layer._kernel)
        update = ops.matmul(product(inputs, layer.lora_kernel_a), layer.lora_kernel_b)
        x = ops.add(x, ops.cast(update * (layer.lora_alpha / layer.lora_rank), x.dtype))
        if layer.bias is not None:
            x = ops.add(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    layer.call = call


def drop_low_rank_call(layer):
    """Restores the layer's own `call` (after its adapters are merged)."""
    vars(layer).pop("call", None)
