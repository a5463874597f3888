"""LoRA computed on the activations (`LoRADense`, `LoRAEinsumDense`): same outputs and gradients as Keras' merged kernel."""

import jax
import keras
import numpy as np
import pytest

from keras_openpi.layers import LoRADense
from keras_openpi.layers import LoRAEinsumDense


def adapted(layer, input_shape, rank=3):
    layer.build(input_shape)
    layer.enable_lora(rank, lora_alpha=5.0)
    rng = np.random.default_rng(0)
    layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape).astype("float32"))
    return layer


def outputs_and_gradients(layer, x):
    variables = layer.trainable_variables

    def loss(values, x):
        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            y = layer(x)
        return (y * y).sum(), y

    values = [v.value for v in variables]
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(values, x)
    return y, grads


@pytest.mark.parametrize(
    "make, input_shape",
    [
        (lambda: LoRADense(6, activation="gelu"), (2, 5, 4)),
        (lambda: LoRAEinsumDense("BTD,NDH->BTNH", (5, 2, 3)), (2, 5, 4)),
        (lambda: LoRAEinsumDense("BTNH,NHD->BTD", (5, 4), bias_axes="D"), (2, 5, 2, 3)),
    ],
)
def test_low_rank_call_matches_merged_kernel(make, input_shape):
    layer = adapted(make(), input_shape)
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    layer.low_rank_call = False  # Keras' own call: the merged kernel
    merged, merged_grads = outputs_and_gradients(layer, x)
    layer.low_rank_call = True
    assert layer._low_rank_multiply() is not None
    low_rank, low_rank_grads = outputs_and_gradients(layer, x)
    np.testing.assert_allclose(np.asarray(low_rank), np.asarray(merged), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(low_rank_grads), jax.tree_util.tree_leaves(merged_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_low_rank_call_keeps_keras_call_for_other_equations():
    # The kernel's last axis (N) is not the output's last axis: Keras' call stays.
    layer = adapted(LoRAEinsumDense("BTD,DN->BNT", (2, 5)), (2, 5, 4))
    assert layer._low_rank_multiply() is None
    x = np.random.default_rng(1).normal(size=(2, 5, 4)).astype("float32")
    expected = np.einsum("btd,dn->bnt", x, np.asarray(layer.kernel))  # Keras' merged kernel
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "int8"])
def test_merge_lora_folds_the_adapters_with_keras_own_merge(quantize):
    """`merge_lora` keeps the outputs (int8: up to requantization) and removes A and B."""
    layer = LoRAEinsumDense("BTD,NDH->BTNH", (5, 2, 3))
    layer.build((2, 5, 4))
    if quantize:
        layer.quantize("int8", config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None))
    layer.enable_lora(3, lora_alpha=5.0)
    rng = np.random.default_rng(0)
    layer.lora_kernel_a.assign(rng.normal(size=layer.lora_kernel_a.shape).astype("float32"))
    layer.lora_kernel_b.assign(0.1 * rng.normal(size=layer.lora_kernel_b.shape).astype("float32"))
    x = rng.normal(size=(2, 5, 4)).astype("float32")
    adapted_output = np.asarray(layer(x))
    layer.merge_lora()
    assert not layer.lora_enabled and [v.name for v in layer.weights if "lora" in v.name] == []
    assert not next(v for v in layer.weights if v.name == "kernel").trainable
    # int8: the merged kernel is requantized (abs-max, 1/254 of each channel's range).
    tolerance = 0.02 * np.abs(adapted_output).max() if quantize else 1e-5
    np.testing.assert_allclose(np.asarray(layer(x)), adapted_output, atol=tolerance, rtol=0)
