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


# === openpi's form: a B per head, openpi's equations and scaling ===

# openpi's `lora.Einsum` equations for each layer equation (its `_make_lora_eqns`,
# written out by hand), and the alpha / rank scale it applies.
OPENPI_EQUATIONS = {
    "btd,ndh->btnh": ("btd,ndL->btnL", "btnL,nLh->btnh"),
    "bsd,kdh->bskh": ("bsd,kdL->bskL", "bskL,kLh->bskh"),
    "btnh,nhd->btd": ("btnh,nhL->btL", "btL,nLd->btd"),  # n summed over B alone
}


def openpi_adapted(layer, input_shape, rank=3, alpha=5.0):
    layer.build(input_shape)
    layer.enable_lora(rank, lora_alpha=alpha, form="openpi")
    rng = np.random.default_rng(0)
    for weight in (layer.lora_kernel_a, layer.lora_kernel_b):
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    return layer


@pytest.mark.parametrize(
    "equation, output_shape, input_shape, b_shape",
    [
        ("btd,ndh->btnh", (5, 2, 3), (2, 5, 4), (2, 3, 3)),
        ("bsd,kdh->bskh", (5, 1, 3), (2, 5, 4), (1, 3, 3)),
        ("btnh,nhd->btd", (5, 4), (2, 5, 2, 3), (2, 3, 4)),
    ],
)
def test_openpi_form_is_openpis_einsum(equation, output_shape, input_shape, b_shape):
    layer = openpi_adapted(LoRAEinsumDense(equation, output_shape), input_shape)
    kernel = np.asarray(layer._kernel)
    a, b = np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b)
    assert a.shape == kernel.shape[:-1] + (3,) and b.shape == b_shape
    x = np.random.default_rng(1).normal(size=input_shape).astype("float32")
    eqn_a, eqn_b = OPENPI_EQUATIONS[equation]
    expected = np.einsum(equation, x, kernel) + 5.0 / 3 * np.einsum(eqn_b, np.einsum(eqn_a, x, a), b)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-4)
    # Keras' call through the merged `kernel` property: the same outputs and gradients.
    low_rank, low_rank_grads = outputs_and_gradients(layer, x)
    layer.low_rank_call = False
    merged, merged_grads = outputs_and_gradients(layer, x)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(low_rank), rtol=1e-5, atol=1e-4)
    for g, h in zip(jax.tree_util.tree_leaves(low_rank_grads), jax.tree_util.tree_leaves(merged_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-3)
    assert [v.name for v in layer.trainable_weights] == ["lora_kernel_a", "lora_kernel_b"]


def test_openpi_form_dense_is_openpis_unscaled_feed_forward():
    layer = openpi_adapted(LoRADense(6, use_bias=False), (2, 5, 4), alpha=7.0)
    assert layer.lora_scale == 1.0 and layer.lora_kernel_b.shape == (3, 6)
    x = np.random.default_rng(1).normal(size=(2, 5, 4)).astype("float32")
    a, b = np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b)
    expected = x @ np.asarray(layer._kernel) + (x @ a) @ b  # openpi's FeedForward._dot: alpha ignored
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-4)


def test_openpi_form_starts_from_openpis_initialization():
    keras.utils.set_random_seed(0)
    layer = LoRAEinsumDense("btd,ndh->btnh", (None, 8, 32))
    layer.build((None, None, 128))
    layer.enable_lora(16, form="openpi")
    for weight in (layer.lora_kernel_a, layer.lora_kernel_b):
        values = np.asarray(weight)
        assert weight.dtype == "float32" and abs(values.std() - 0.01) < 1e-3 and abs(values.mean()) < 1e-3


def test_openpi_form_merge_and_save():
    layer = openpi_adapted(LoRAEinsumDense("btnh,nhd->btd", (5, 4)), (2, 5, 2, 3))
    x = np.random.default_rng(2).normal(size=(2, 5, 2, 3)).astype("float32")
    adapted_output = np.asarray(layer(x))
    # A layer's own save and load keep A and B as they are (Keras' would merge, then zero them).
    store = {}
    layer.save_own_variables(store)
    assert sorted(store) == ["kernel", "lora_kernel_a", "lora_kernel_b"]
    twin = LoRAEinsumDense.from_config(layer.get_config())
    assert twin.get_config()["lora_form"] == "openpi" and twin.lora_form == "openpi"
    twin.build((2, 5, 2, 3))
    assert twin.lora_enabled and twin.lora_kernel_b.shape == (2, 3, 4)
    twin.load_own_variables(store)
    np.testing.assert_array_equal(np.asarray(twin(x)), adapted_output)
    layer.merge_lora()
    assert not layer.lora_enabled and [v.name for v in layer.weights] == ["kernel"]
    np.testing.assert_allclose(np.asarray(layer(x)), adapted_output, rtol=1e-5, atol=1e-4)


def test_openpi_form_errors():
    layer = LoRAEinsumDense("btd,ndh->btnh", (None, 2, 4))
    layer.build((None, None, 8))
    with pytest.raises(ValueError, match="LoRA form must be one of \\('keras', 'openpi'\\), got 'flax'"):
        layer.enable_lora(2, form="flax")
    heads_last = LoRAEinsumDense("btd,dnh->btnh", (5, 2, 3))  # the kernel's axis -2 is an output axis
    heads_last.build((2, 5, 4))
    with pytest.raises(ValueError, match="kernel's last two axes are an input axis and an output axis .* got 'btd,dnh->btnh'"):
        heads_last.enable_lora(2, form="openpi")
    layer.quantize("int8")
    with pytest.raises(ValueError, match="is quantized \\(int8\\); openpi's LoRA form adapts float kernels"):
        layer.enable_lora(2, form="openpi")
    assert not layer.lora_enabled
