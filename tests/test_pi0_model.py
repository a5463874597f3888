"""Pi0's Keras API: observation checks, config and .keras round trips, fit."""

import keras
import numpy as np
import pytest

from keras_openpi.models import Pi0

GEMMA = dict(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
VISION = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16)


def small_pi0(**overrides):
    kwargs = dict(
        paligemma_variant=GEMMA,
        action_expert_variant=dict(GEMMA, width=16, mlp_dim=32),
        vision_variant=VISION,
        vocabulary_size=64,
        action_dim=6,
        action_horizon=4,
        max_token_len=8,
        image_resolution=(32, 32),
        seed=0,
    )
    kwargs.update(overrides)
    return Pi0(**kwargs)


def observation(model, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    h, w = model.image_resolution
    return {
        "image": {
            k: rng.uniform(-1, 1, (batch, h, w, 3)).astype("float32")
            for k in model.image_keys
        },
        "image_mask": {k: np.ones((batch,), bool) for k in model.image_keys},
        "state": rng.normal(size=(batch, model.action_dim)).astype("float32"),
        "tokenized_prompt": rng.integers(0, model.vocabulary_size, (batch, model.max_token_len)).astype("int32"),
        "tokenized_prompt_mask": np.ones((batch, model.max_token_len), bool),
    }


@pytest.fixture(scope="module")
def model():
    return small_pi0()


@pytest.fixture(scope="module", params=[False, True], ids=["pi0", "pi05"])
def any_model(request):
    return small_pi0(pi05=request.param)


def test_shapes_and_defaults(model):
    assert model.name == "pi0" and small_pi0(pi05=True).name == "pi05"
    assert Pi0("dummy", "dummy", "tiny/16", vocabulary_size=8).max_token_len == 48
    obs = observation(model)
    noise = np.zeros((2, 4, 6), "float32")
    assert model.sample_actions(obs, noise=noise, num_steps=3).shape == (2, 4, 6)
    loss = model.flow_matching_loss(obs, np.zeros((2, 4, 6), "float32"))
    assert loss.shape == (2, 4) and np.all(np.isfinite(loss))


def test_drawn_time_follows_openpi(model):
    """With time omitted, t = Beta(1.5, 1) * 0.999 + 0.001: mean 0.6 * 0.999 + 0.001."""
    draws = keras.random.beta((20000,), 1.5, 1.0, seed=1) * 0.999 + 0.001
    draws = np.asarray(draws)
    assert draws.min() >= 0.001 and draws.max() <= 1.0
    assert abs(draws.mean() - (0.6 * 0.999 + 0.001)) < 0.01


def test_uint8_images_equal_their_float_form(model):
    obs = observation(model)
    as_uint8 = {k: np.round((v + 1) / 2 * 255).astype("uint8") for k, v in obs["image"].items()}
    as_float = {k: v.astype("float32") / 255 * 2 - 1 for k, v in as_uint8.items()}
    noise = np.random.default_rng(1).normal(size=(2, 4, 6)).astype("float32")
    a = model.sample_actions({**obs, "image": as_uint8}, noise=noise, num_steps=2)
    b = model.sample_actions({**obs, "image": as_float}, noise=noise, num_steps=2)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_other_resolutions_are_resized_with_padding(model):
    obs = observation(model)
    wide = {k: np.full((2, 16, 64, 3), 0.5, "float32") for k in model.image_keys}
    prepared = model.prepare_observation({**obs, "image": wide})
    image = np.asarray(prepared["images"][0])
    assert image.shape == (2, 32, 32, 3)
    # 16x64 -> 8x32, padded with -1 above and below (12 rows each side).
    np.testing.assert_allclose(image[:, :12], -1.0)
    np.testing.assert_allclose(image[:, 20:], -1.0)
    np.testing.assert_allclose(image[:, 12:20], 0.5, atol=1e-6)


def test_missing_masks_default_to_true(model):
    obs = observation(model)
    del obs["image_mask"], obs["tokenized_prompt_mask"]
    prepared = model.prepare_observation(obs)
    assert all(np.asarray(m).all() for m in prepared["image_masks"])
    assert np.asarray(prepared["token_mask"]).all()


def test_short_state_and_prompt_are_padded(model):
    obs = observation(model)
    obs["state"] = obs["state"][:, :3]
    obs["tokenized_prompt"] = obs["tokenized_prompt"][:, :5]
    obs["tokenized_prompt_mask"] = obs["tokenized_prompt_mask"][:, :5]
    prepared = model.prepare_observation(obs)
    assert prepared["state"].shape == (2, 6) and np.all(np.asarray(prepared["state"])[:, 3:] == 0)
    assert prepared["tokens"].shape == (2, 8)
    assert np.asarray(prepared["token_mask"]).sum() == 10


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o.pop("state"), "missing the key 'state'"),
        (lambda o: o.pop("image"), "missing the key 'image'"),
        (lambda o: o["image"].pop("left_wrist_0_rgb"), "missing the key 'left_wrist_0_rgb'"),
        (lambda o: o.update(state=np.zeros((2, 7), "float32")), r"'state' must have shape \(B, s\) with s <= action_dim = 6, got shape \(2, 7\)"),
        (lambda o: o.update(state=np.zeros((6,), "float32")), r"'state' must have shape .* got shape \(6,\)"),
        (lambda o: o["image"].update(base_0_rgb=np.zeros((32, 32, 3), "float32")), r"'image/base_0_rgb' must have shape \(B, H, W, 3\), got shape \(32, 32, 3\)"),
        (lambda o: o["image"].update(base_0_rgb=np.zeros((2, 32, 32, 4), "float32")), r"'image/base_0_rgb' must have shape \(B, H, W, 3\)"),
        (lambda o: o.update(tokenized_prompt=np.zeros((2, 9), "int32")), r"'tokenized_prompt' must have shape \(B, L\) with L <= max_token_len = 8"),
        (lambda o: o.update(tokenized_prompt_mask=np.ones((2, 3), bool)), "'tokenized_prompt_mask' must have the shape"),
    ],
)
def test_bad_observations_name_the_key(model, mutate, message):
    obs = observation(model)
    mutate(obs)
    with pytest.raises(ValueError, match=message):
        model.sample_actions(obs)


def test_bad_actions_name_the_shape(model):
    with pytest.raises(ValueError, match=r"'actions' must have shape \(B, 4, a\) with a <= 6, got shape \(2, 5, 6\)"):
        model.flow_matching_loss(observation(model), np.zeros((2, 5, 6), "float32"))


def test_config_round_trip(any_model):
    config = any_model.get_config()
    clone = Pi0.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == any_model.count_params()
    assert [v.path for v in clone.weights] == [v.path for v in any_model.weights]


def test_keras_file_round_trip_is_identical(any_model, tmp_path):
    obs = observation(any_model)
    noise = np.random.default_rng(2).normal(size=(2, 4, 6)).astype("float32")
    actions = np.random.default_rng(3).normal(size=(2, 4, 6)).astype("float32")
    time = np.array([0.3, 0.8], "float32")
    path = tmp_path / "policy.keras"
    any_model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is Pi0 and loaded.pi05 == any_model.pi05
    np.testing.assert_array_equal(
        np.asarray(loaded.sample_actions(obs, noise=noise)),
        np.asarray(any_model.sample_actions(obs, noise=noise)),
    )
    np.testing.assert_array_equal(
        np.asarray(loaded.flow_matching_loss(obs, actions, noise=noise, time=time)),
        np.asarray(any_model.flow_matching_loss(obs, actions, noise=noise, time=time)),
    )


def test_fit_evaluate_predict():
    model = small_pi0(seed=3)
    obs = observation(model, batch=4)
    actions = np.random.default_rng(4).normal(size=(4, 4, 6)).astype("float32")
    before = [np.array(v) for v in model.trainable_variables]
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.0))
    history = model.fit(obs, actions, batch_size=2, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])
    moved = [not np.array_equal(b, np.asarray(v)) for b, v in zip(before, model.trainable_variables)]
    # The action expert reads the VLM only through each block's keys and values, so
    # the VLM's last query, output, feed-forward and final norm get no gradient;
    # everything else moves.
    unused = [v.path for v, m in zip(model.trainable_variables, moved) if not m]
    last = "pi0/gemma/decoder_block_1/vlm"
    assert unused == [
        f"{last}/attention/query/kernel",
        f"{last}/attention/output/kernel",
        f"{last}/pre_feed_forward_norm/scale",
        f"{last}/feed_forward/gate/kernel",
        f"{last}/feed_forward/up/kernel",
        f"{last}/feed_forward/down/kernel",
        "pi0/gemma/vlm_final_norm/scale",
    ]
    loss = model.evaluate(obs, actions, batch_size=2, verbose=0)
    assert np.isfinite(loss)
    assert model.predict(obs, batch_size=2, verbose=0).shape == (4, 4, 6)


def test_fit_without_actions_is_a_clear_error():
    model = small_pi0()
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="trains on \\(observation, actions\\) pairs"):
        model.fit(observation(model), batch_size=2, epochs=1, verbose=0)


def test_mismatched_experts_are_rejected():
    with pytest.raises(ValueError, match="must share 'depth'"):
        small_pi0(action_expert_variant=dict(GEMMA, depth=3))
    with pytest.raises(ValueError, match="Unknown Gemma variant 'gemma_7b'"):
        small_pi0(paligemma_variant="gemma_7b")
    with pytest.raises(ValueError, match="Unknown SigLIP variant"):
        small_pi0(vision_variant="So400m")
