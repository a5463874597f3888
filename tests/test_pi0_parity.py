"""π0 / π0.5 against openpi's own JAX outputs (tests/fixtures/openpi), float32, 1e-4."""

import keras
import numpy as np
import pytest

from keras_openpi.convert import pi0_from_openpi

ATOL = 1e-4
CASES = {"pi0": "pi0", "pi05": "pi05", "pi0_lora": "pi0"}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, openpi_fixture):
    fixture = openpi_fixture(request.param)
    model = pi0_from_openpi(
        fixture.path,
        action_horizon=fixture.meta["action_horizon"],
        max_token_len=fixture.meta["max_token_len"],
        model=CASES[request.param],
        lora_scale=fixture.meta["lora_alpha"] / fixture.meta["lora_rank"],
    )
    return fixture, model, fixture.observation(model.image_keys)


def test_image_encoder(case):
    fixture, model, observation = case
    obs = model.prepare_observation(observation)
    for key, image in zip(model.image_keys, obs["images"]):
        encoded = keras.ops.convert_to_numpy(model.vision_encoder.encode(image))
        np.testing.assert_allclose(
            encoded, fixture[f"output/image_encoded/{key}"], atol=ATOL, rtol=0
        )


def test_prefix_tokens(case):
    fixture, model, observation = case
    tokens, mask, _ = model.embed_prefix(model.prepare_observation(observation))
    assert tokens.shape == (2, 3 * 196 + 16, 64)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(tokens), fixture["output/prefix_tokens"], atol=ATOL, rtol=0
    )
    # The masked camera's 196 tokens are masked, the rest follow the inputs.
    assert int(keras.ops.convert_to_numpy(mask).sum()) == int(
        196 * sum(fixture[f"input/masks/{k}"].sum() for k in model.image_keys)
        + fixture["input/tmask"].sum()
    )


def test_velocity(case):
    fixture, model, observation = case
    time = fixture["input/time"][:, None, None]
    x_t = time * fixture["input/noise"] + (1 - time) * fixture["input/actions"]
    np.testing.assert_allclose(x_t, fixture["output/x_t"], atol=1e-6, rtol=0)
    velocity = model.predict_velocity(
        model.prepare_observation(observation), x_t, fixture["input/time"]
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(velocity), fixture["output/v_t"], atol=ATOL, rtol=0
    )


def test_flow_matching_loss(case):
    fixture, model, observation = case
    loss = model.flow_matching_loss(
        observation,
        fixture["input/actions"],
        noise=fixture["input/noise"],
        time=fixture["input/time"],
    )
    assert loss.shape == (2, fixture.meta["action_horizon"])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss), fixture["output/loss"], atol=ATOL, rtol=0)


def test_sample_actions(case):
    fixture, model, observation = case
    sampled = model.sample_actions(
        observation, noise=fixture["input/noise"], num_steps=fixture.meta["num_steps"]
    )
    assert sampled.shape == fixture["output/sampled"].shape
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(sampled), fixture["output/sampled"], atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "bfloat16"])
def test_bfloat16_sampling_stays_close(openpi_fixture, dtype):
    fixture = openpi_fixture("pi0")
    model = pi0_from_openpi(
        fixture.path, action_horizon=10, max_token_len=16, model="pi0", dtype=dtype
    )
    sampled = model.sample_actions(
        fixture.observation(model.image_keys), noise=fixture["input/noise"], num_steps=10
    )
    error = np.abs(keras.ops.convert_to_numpy(sampled).astype("float32") - fixture["output/sampled"]).max()
    assert error < 5e-2
    assert error > 1e-6  # it really ran in bfloat16
