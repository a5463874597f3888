"""Tiny policies and a two-step `fit` shared by the fine-tuning tests."""

import re

import keras
import numpy as np

from keras_openpi.models import small_model
from keras_openpi.models.presets import TINY_GEMMA
from keras_openpi.models.presets import TINY_VISION

VLM, VISION = TINY_GEMMA, TINY_VISION
DEPTH = TINY_GEMMA["depth"]
BATCH = 4  # two steps of 2

# π0 discards the VLM's output (only the suffix is decoded), so these weights
# get no gradient in any strategy: the VLM final norm, and in the last block
# everything of the VLM after its keys and values.
LAST = f"gemma/decoder_block_{DEPTH - 1}/vlm"
NO_GRADIENT = re.compile(
    rf"gemma/vlm_final_norm/.*|{LAST}/(attention/(query|output)|pre_feed_forward_norm|feed_forward)/.*"
)


def tiny_pi0(**overrides):
    """The `pi0_tiny` preset (`pi05=True`: π0.5)."""
    return small_model("pi0_tiny", **overrides)


def tiny_policy(model_type, **overrides):
    """The tiny π0 (`pi0`), π0.5 (`pi05`) or π0-FAST (`pi0_fast`)."""
    if model_type == "pi0_fast":
        return small_model("pi0_fast_tiny", **overrides)
    return small_model("pi0_tiny", pi05=model_type == "pi05", **overrides)


def training_batch(model, size=BATCH, seed=0):
    """Random `(observation, actions)`; π0-FAST's actions are in its tokens (None)."""
    rng = np.random.default_rng(seed)
    h, w = model.image_resolution
    length = model.max_token_len
    observation = {
        "image": {
            k: rng.uniform(-1, 1, (size, h, w, 3)).astype("float32") for k in model.image_keys
        },
        "image_mask": {k: np.ones((size,), bool) for k in model.image_keys},
        "tokenized_prompt": rng.integers(0, model.vocabulary_size, (size, length)).astype("int32"),
        "tokenized_prompt_mask": np.ones((size, length), bool),
    }
    if model.model_type == "pi0_fast":
        postfix = np.arange(length) >= length // 2  # a bidirectional prefix, then a causal postfix
        observation["token_ar_mask"] = np.broadcast_to(postfix, (size, length)).astype("int32")
        observation["token_loss_mask"] = np.broadcast_to(postfix, (size, length)).copy()
        return observation, None
    observation["state"] = rng.normal(size=(size, model.action_dim)).astype("float32")
    actions = rng.normal(size=(size, model.action_horizon, model.action_dim)).astype("float32")
    return observation, actions


def relative(model, variable):
    return variable.path.removeprefix(f"{model.name}/")


def snapshot(model):
    """`{relative path: (numpy value, trainable)}` of every weight."""
    return {relative(model, v): (np.array(v.numpy()), v.trainable) for v in model.weights}


def fit_two_steps(model):
    """Two Adam steps (no weight decay: only a gradient moves a weight), run eagerly.

    Eager steps reuse the per-op compilations of earlier tests, which keeps
    the suite fast; the trainer differentiates exactly as the jitted one
    (`jax.value_and_grad` with respect to `model.trainable_variables`).
    """
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    observation, actions = training_batch(model)
    model.fit(observation, actions, batch_size=BATCH // 2, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2


def check_two_steps(model, before):
    """Frozen weights bit-identical; trainable ones moved unless π0 gives them no gradient."""
    after = snapshot(model)
    assert sorted(after) == sorted(before)
    stuck, moved_frozen = [], []
    for path, (value, trainable) in before.items():
        changed = not np.array_equal(value, after[path][0])
        if trainable and not changed and not NO_GRADIENT.fullmatch(path):
            stuck.append(path)
        if not trainable and changed:
            moved_frozen.append(path)
    assert moved_frozen == []
    assert stuck == []


def check_optimizer_slots(model):
    """The optimizer holds two slots per trainable weight and nothing for frozen ones."""
    name = model.optimizer.name
    slots = {v.path for v in model.optimizer.variables} - {f"{name}/iteration", f"{name}/learning_rate"}
    expected = {
        f"{name}/{v.path.replace('/', '_')}_{slot}"
        for v in model.trainable_variables
        for slot in ("momentum", "velocity")
    }
    assert slots == expected
    assert len(model.optimizer.variables) == 2 * len(model.trainable_variables) + 2


def randomize_adapters(model, seed=1, scale=0.1):
    """Non-zero A and B (Keras starts B at zero, which would make merges trivial)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if v.name in ("lora_kernel_a", "lora_kernel_b"):
            v.assign(rng.normal(scale=scale, size=v.shape).astype("float32"))


def fixed_velocity(model, seed=2):
    observation, actions = training_batch(model, size=2, seed=seed)
    obs = model.prepare_observation(observation)
    time = np.array([0.3, 0.8], "float32")
    noise = np.random.default_rng(seed).normal(size=actions.shape).astype("float32")
    x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
    return keras.ops.convert_to_numpy(model.predict_velocity(obs, x_t, time))
