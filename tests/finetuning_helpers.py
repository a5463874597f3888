"""A tiny π0 and a two-step `fit` shared by the fine-tuning tests."""

import re

import keras
import numpy as np

from keras_openpi.models import Pi0

DEPTH = 2
VLM = dict(width=32, depth=DEPTH, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=8)
EXPERT = dict(VLM, width=16, mlp_dim=32)
VISION = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=16)
BATCH = 4  # two steps of 2

# π0 discards the VLM's output (only the suffix is decoded), so these weights
# get no gradient in any strategy: the VLM final norm, and in the last block
# everything of the VLM after its keys and values.
LAST = f"gemma/decoder_block_{DEPTH - 1}/vlm"
NO_GRADIENT = re.compile(
    rf"gemma/vlm_final_norm/.*|{LAST}/(attention/(query|output)|pre_feed_forward_norm|feed_forward)/.*"
)


def tiny_pi0(**overrides):
    kwargs = dict(
        paligemma_variant=VLM,
        action_expert_variant=EXPERT,
        vision_variant=VISION,
        vocabulary_size=64,
        action_dim=4,
        action_horizon=3,
        max_token_len=5,
        image_keys=("base_0_rgb", "left_wrist_0_rgb"),
        image_resolution=(32, 32),
        seed=0,
    )
    kwargs.update(overrides)
    return Pi0(**kwargs)


def training_batch(model, size=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    h, w = model.image_resolution
    observation = {
        "image": {
            k: rng.uniform(-1, 1, (size, h, w, 3)).astype("float32") for k in model.image_keys
        },
        "image_mask": {k: np.ones((size,), bool) for k in model.image_keys},
        "state": rng.normal(size=(size, model.action_dim)).astype("float32"),
        "tokenized_prompt": rng.integers(0, model.vocabulary_size, (size, model.max_token_len)).astype("int32"),
        "tokenized_prompt_mask": np.ones((size, model.max_token_len), bool),
    }
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
