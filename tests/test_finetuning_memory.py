"""Memory levers: bfloat16 frozen weights, int8 frozen bases (QLoRA), rematerialization."""

import jax
import keras
import numpy as np
from finetuning_helpers import check_optimizer_slots
from finetuning_helpers import check_two_steps
from finetuning_helpers import fit_two_steps
from finetuning_helpers import fixed_velocity
from finetuning_helpers import snapshot
from finetuning_helpers import tiny_pi0
from finetuning_helpers import training_batch
from keras import ops

from keras_openpi.backend.remat import row_chunked_call
from keras_openpi.finetuning.memory import set_remat

RANK = {"vlm": 4, "action_expert": 2}


def check_keras_round_trip(model, path):
    model.save(path)
    reloaded = keras.saving.load_model(path)
    before, after = snapshot(model), snapshot(reloaded)
    assert sorted(before) == sorted(after)
    for name, (value, trainable) in before.items():
        assert after[name][0].dtype == value.dtype, name
        np.testing.assert_array_equal(after[name][0], value, err_msg=name)
        assert after[name][1] == trainable, name
    return reloaded


def test_frozen_bfloat16_with_remat_trains_compiled(tmp_path):
    model = tiny_pi0()
    model.apply_strategy("lora", rank=RANK, frozen_dtype="bfloat16", remat=True)
    assert {str(v.dtype) for v in model.weights if not v.trainable} == {"bfloat16"}
    assert {str(v.dtype) for v in model.trainable_weights} == {"float32"}
    summary = model.trainable_summary()
    assert summary["total"]["frozen_bytes"] == 2 * summary["total"]["frozen"]

    model.compile(optimizer=keras.optimizers.Adam(1e-3))  # jitted: remat needs a compiled step on JAX
    observation, actions = training_batch(model)
    before = snapshot(model)
    model.fit(observation, actions, batch_size=2, shuffle=False, verbose=0)
    check_two_steps(model, before)
    check_optimizer_slots(model)
    assert {str(v.dtype) for v in model.optimizer.variables[2:]} == {"float32"}

    reloaded = check_keras_round_trip(model, tmp_path / "bf16.keras")
    assert reloaded.finetuning_state.frozen_dtype == "bfloat16"
    assert reloaded.finetuning_state.remat
    assert "remat" in reloaded.gemma.decoder_blocks[0].call_levers


def test_remat_leaves_gradients_unchanged():
    model = tiny_pi0()
    model.apply_strategy("lora_action_expert", rank=2)
    randomize = np.random.default_rng(3)
    for v in model.trainable_weights:
        v.assign(v.numpy() + randomize.normal(scale=0.01, size=v.shape).astype("float32"))
    observation, actions = training_batch(model, size=2)
    noise = np.random.default_rng(4).normal(size=actions.shape).astype("float32")
    time = np.array([0.3, 0.7], "float32")
    variables = model.trainable_variables

    def loss(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
            return ops.mean(model.flow_matching_loss(observation, actions, noise=noise, time=time))

    def count(values, primitive):
        # Conditionals and scans of the gradient program, nested ones included.
        return str(jax.make_jaxpr(jax.grad(loss))(values)).count(f" {primitive}[")

    values = [v.value for v in variables]
    plain = jax.grad(loss)(values)
    assert count(values, "cond") == count(values, "scan") == 0
    # (sequenced forward, feed-forward rows) -> (conditionals, scans): one recomputation
    # per call of a decoder block (2) and of the SigLIP block (once per camera, 2);
    # with the forward sequenced, one more each. 8 rows: the prefix's 2 x 10 tokens in
    # 3 chunks, the suffix's 2 x 4 in one; scanned in the forward (1 + 1 recomputed) and
    # the backward pass, in each of the 2 blocks.
    expected = {(False, None): (4, 0), (True, None): (8, 0), (True, 8): (8, 6)}
    for (sequenced, rows), (conds, scans) in expected.items():
        model.enable_sequencing(sequenced)
        set_remat(model, True, feed_forward_rows=rows)
        assert (count(values, "cond"), count(values, "scan")) == (conds, scans), (sequenced, rows)
        rematerialized = jax.grad(loss)(values)
        for v, a, b in zip(variables, plain, rematerialized, strict=True):
            # float32 recomputation reorders sums: up to ~1e-5 on gradients of size ~0.2.
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4, err_msg=v.path)
    model.enable_remat(False)
    model.enable_sequencing(False)
    assert count(values, "cond") == count(values, "scan") == 0


def test_row_chunked_call_matches_the_layer_on_ragged_chunks():
    layer = keras.layers.Dense(3)
    layer.build((None, None, 4))
    x = np.random.default_rng(0).normal(size=(2, 7, 4)).astype("float32")
    chunked = row_chunked_call(layer, layer.call, max_rows=5)  # 14 rows: 3 chunks of 3 tokens, 2 padded
    np.testing.assert_allclose(chunked(x), layer.call(x), atol=1e-6)
    grad = jax.grad(lambda v: ops.sum(chunked(v) ** 2))(x)
    np.testing.assert_allclose(grad, jax.grad(lambda v: ops.sum(layer.call(v) ** 2))(x), atol=1e-5)


def test_sequenced_sampling_gives_the_same_actions():
    model = tiny_pi0()
    observation, _ = training_batch(model, size=2)
    noise = np.random.default_rng(5).normal(size=(2, model.action_horizon, model.action_dim))
    model.enable_sequencing(False)
    plain = model.sample_actions(observation, noise=noise, num_steps=3)
    model.enable_sequencing(True)
    assert all(v.call_levers == {"sequenced"} for v in model.remat_layers())
    sequenced = model.sample_actions(observation, noise=noise, num_steps=3)
    np.testing.assert_allclose(np.asarray(sequenced), np.asarray(plain), atol=1e-6)


def test_qlora_trains_only_adapters_and_float_layers(tmp_path):
    model = tiny_pi0()
    model.apply_strategy("lora", rank=RANK, quantize="int8_weight_only")
    query = model.gemma.decoder_blocks[0].experts[0].attention.query
    assert query.quantization_mode == "int8" and query.lora_enabled
    assert str(model.gemma.token_embedding.quantization_mode) == "int8"
    assert model.vision_encoder.head.quantization_mode is None  # vision trains in float
    int8 = [v for v in model.weights if str(v.dtype) == "int8"]
    assert len(int8) == 2 * 7 * 2 + 1 and not any(v.trainable for v in int8)
    summary = model.trainable_summary()
    assert summary["vlm"]["frozen_bytes"] < 2 * summary["vlm"]["frozen"]

    before = snapshot(model)
    fit_two_steps(model)
    check_two_steps(model, before)  # int8 kernels and scales bit-identical, adapters moved
    check_optimizer_slots(model)
    reloaded = check_keras_round_trip(model, tmp_path / "qlora.keras")
    down = reloaded.gemma.decoder_blocks[1].experts[1].feed_forward.down
    assert down.quantization_mode == "int8" and down.inputs_quantizer is None  # weight-only
    np.testing.assert_array_equal(fixed_velocity(reloaded), fixed_velocity(model))


def test_keras_quantize_then_enable_lora():
    model = tiny_pi0()
    model.quantize("int8")
    model.enable_lora(rank=2)
    trainable = model.trainable_weights
    assert all(keras.backend.is_float_dtype(v.dtype) for v in trainable)
    assert not any(v.name == "kernel" and "gemma" in v.path for v in trainable)
    assert sum(v.name.startswith("lora_kernel") for v in trainable) == 2 * 7 * 2 * 2
    # Keras quantizes every Dense / EinsumDense: the vision kernels are int8 (frozen), their biases train.
    assert str(model.vision_encoder.head.kernel.dtype) == "int8"
    assert model.vision_encoder.head.bias.trainable
    quantized = model.get_config()["finetuning"]["quantized"]
    assert [q["mode"] for q in quantized] == ["int8"] and "vision_encoder/head" in quantized[0]["layers"]


def test_shapes_only_int8_quantization_matches_keras():
    """Inside `shapes_only()` int8 quantization gives the weights Keras' own quantization gives."""
    from finetuning_helpers import relative

    from keras_openpi.finetuning import shapes_only
    from keras_openpi.finetuning.memory import quantize_layers

    def describe(model):
        return [(relative(model, v), tuple(v.shape), str(v.dtype), v.trainable) for v in model.weights]

    real = tiny_pi0()
    quantize_layers(real, [real.vision_encoder, real.gemma], "int8_weight_only")
    with shapes_only():
        abstract = tiny_pi0()
        quantize_layers(abstract, [abstract.vision_encoder, abstract.gemma], "int8_weight_only")
    assert describe(abstract) == describe(real)
    assert any(dtype == "int8" for _, _, dtype, _ in describe(real))
    layers = [abstract.gemma.decoder_blocks[0].experts[0].attention.query, abstract.gemma.token_embedding]
    assert all(layer.inputs_quantizer is None for layer in layers)  # the requested weight-only config
