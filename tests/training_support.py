"""Shared pieces of the training tests: a tiny π0 and the `demo` config shrunk to it."""

import dataclasses
import json

import numpy as np

from keras_openpi.training.config import get_config

TINY_GEMMA = dict(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
TINY_MODEL = dict(
    paligemma_variant=TINY_GEMMA,
    action_expert_variant=TINY_GEMMA,
    vision_variant=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16),
    vocabulary_size=259,
    action_dim=8,
    action_horizon=10,
    max_token_len=32,
    image_resolution=[32, 32],
)
# The same, as `keras-openpi train --set` arguments; with the demo's data made small.
TINY_MODEL_SETS = [f"model.{key}={json.dumps(value)}" for key, value in TINY_MODEL.items()]
TINY_SETS = [*TINY_MODEL_SETS, 'data.source_options={"num_episodes": 3, "image_size": 32}']


def tiny_demo_config(tmp_path, **changes):
    """The `demo` config with the tiny π0, 3 generated episodes, batch 4, 8 steps, in `tmp_path`."""
    config = get_config("demo")
    data = dataclasses.replace(config.data, source_options={"num_episodes": 3, "image_size": 32})
    values = dict(
        model=dict(config.model, **TINY_MODEL),
        data=data,
        batch_size=4,
        num_train_steps=8,
        save_interval=2,
        assets_dir=str(tmp_path / "assets"),
        checkpoint_base_dir=str(tmp_path / "checkpoints"),
    )
    values.update(changes)
    return dataclasses.replace(config, **values)


def tiny_observation(batch, seed=0, action_dim=8, horizon=10, tokens=32, image=32):
    """Random `(observation, actions)` numpy arrays for the tiny π0."""
    rng = np.random.default_rng(seed)
    cameras = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    observation = {
        "image": {
            k: rng.uniform(-1, 1, (batch, image, image, 3)).astype("float32") for k in cameras
        },
        "image_mask": {k: np.ones((batch,), bool) for k in cameras},
        "state": rng.normal(size=(batch, action_dim)).astype("float32"),
        "tokenized_prompt": rng.integers(0, 259, (batch, tokens)).astype("int32"),
        "tokenized_prompt_mask": np.ones((batch, tokens), bool),
    }
    actions = rng.normal(size=(batch, horizon, action_dim)).astype("float32")
    return observation, actions
