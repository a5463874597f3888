"""LoRA computed on the activations: same outputs and gradients as Keras' merged kernel."""

import jax
import keras
import numpy as np
import pytest

from keras_openpi.finetuning.lora_call import drop_low_rank_call
from keras_openpi.finetuning.lora_call import use_low_rank_call


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
        (lambda: keras.layers.Dense(6, activation="gelu"), (2, 5, 4)),
        (lambda: keras.layers.EinsumDense("BTD,NDH->BTNH", (5, 2, 3)), (2, 5, 4)),
        (lambda: keras.layers.EinsumDense("BTNH,NHD->BTD", (5, 4), bias_axes="D"), (2, 5, 2, 3)),
    ],
)
def test_low_rank_call_matches_merged_kernel(make, input_shape):
    layer = adapted(make(), input_shape)
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    merged, merged_grads = outputs_and_gradients(layer, x)
    use_low_rank_call(layer)
    assert "call" in vars(layer)
    low_rank, low_rank_grads = outputs_and_gradients(layer, x)
    np.testing.assert_allclose(np.asarray(low_rank), np.asarray(merged), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(low_rank_grads), jax.tree_util.tree_leaves(merged_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    drop_low_rank_call(layer)
    assert "call" not in vars(layer)


def test_low_rank_call_keeps_keras_call_for_other_equations():
    # The kernel's last axis (N) is not the output's last axis: Keras' call stays.
    layer = adapted(keras.layers.EinsumDense("BTD,DN->BNT", (2, 5)), (2, 5, 4))
    use_low_rank_call(layer)
    assert "call" not in vars(layer)
    with pytest.raises(ValueError, match="is a Conv2D, not a Dense or EinsumDense"):
        use_low_rank_call(keras.layers.Conv2D(2, 3, name="conv2d"))
