"""Robot mappings equal to openpi's aloha_policy.py, droid_policy.py and libero_policy.py."""

import math

import numpy as np
import pytest

from keras_openpi.data.robots import AlohaInputs
from keras_openpi.data.robots import AlohaOutputs
from keras_openpi.data.robots import DroidInputs
from keras_openpi.data.robots import DroidOutputs
from keras_openpi.data.robots import LiberoInputs
from keras_openpi.data.robots import LiberoOutputs
from keras_openpi.data.robots import RawInputs
from keras_openpi.data.robots import aloha
from keras_openpi.data.robots import droid
from keras_openpi.data.robots import get_robot
from keras_openpi.data.robots import libero
from keras_openpi.data.transforms import AbsoluteActions
from keras_openpi.data.transforms import DeltaActions
from keras_openpi.data.transforms import compose

# === ALOHA ===


def _to_angular(value):
    """openpi's `_gripper_to_angular` written out: ALOHA linear → Interbotix angle → π range."""
    linear = value * (0.05800 - 0.01844) + 0.01844
    sine = (0.022**2 + linear**2 - 0.036**2) / (2 * 0.022 * linear)
    return (math.asin(max(-1.0, min(1.0, sine))) - 0.5476) / (1.6296 - 0.5476)


def test_aloha_gripper_conversions():
    # Values of openpi's formulas, computed by hand (double precision).
    expected = {0.0: -1.0798655475132917, 0.5: -0.1400559217021429, 1.0: 0.945652797407483}
    for value, angular in expected.items():
        assert aloha.gripper_to_angular(np.float64(value)) == pytest.approx(angular, abs=1e-12)
        assert _to_angular(value) == pytest.approx(angular, abs=1e-12)
    # from_angular: (v + 0.5476 - (-0.6213)) / (1.4910 - (-0.6213)); inv undoes it.
    assert aloha.gripper_from_angular(0.0) == pytest.approx(1.1689 / 2.1123, abs=1e-12)
    assert aloha.gripper_from_angular(0.5) == pytest.approx(0.7900866354211049, abs=1e-12)
    assert aloha.gripper_from_angular_inv(1.0) == pytest.approx(0.9434, abs=1e-12)
    for v in (-0.3, 0.2, 0.9):
        assert aloha.gripper_from_angular_inv(aloha.gripper_from_angular(v)) == pytest.approx(v)


def _aloha_sample(horizon=3):
    rng = np.random.default_rng(0)
    return {
        "images": {
            "cam_high": rng.integers(0, 256, (3, 6, 8), dtype=np.uint8),
            "cam_low": rng.integers(0, 256, (3, 6, 8), dtype=np.uint8),
            "cam_left_wrist": rng.uniform(0, 1, (3, 6, 8)).astype(np.float32),
        },
        "state": np.linspace(-0.6, 0.7, 14),
        "actions": rng.uniform(-1, 1, (horizon, 14)),
        "prompt": "fold the towel",
    }


def test_aloha_inputs():
    sample = _aloha_sample()
    out = AlohaInputs()(sample)
    state = sample["state"]
    flips = [1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1]
    expected = np.array([f * s for f, s in zip(flips, state)])
    expected[6] = _to_angular(state[6])
    expected[13] = _to_angular(state[13])
    np.testing.assert_allclose(out["state"], expected, rtol=1e-6)
    assert out["state"].dtype == np.float64  # openpi's int flip mask promotes to float64
    actions = sample["actions"]
    expected = actions * np.array(flips)
    expected[:, [6, 13]] = actions[:, [6, 13]] * (1.4910 + 0.6213) - 0.6213 - 0.5476
    np.testing.assert_allclose(out["actions"], expected, rtol=1e-6, atol=1e-7)
    # Cameras: CHW → HWC uint8; the missing right wrist is black with mask False; cam_low unused.
    assert sorted(out["image"]) == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    np.testing.assert_array_equal(
        out["image"]["base_0_rgb"], sample["images"]["cam_high"].transpose(1, 2, 0)
    )
    np.testing.assert_array_equal(
        out["image"]["left_wrist_0_rgb"],
        (255 * sample["images"]["cam_left_wrist"]).astype(np.uint8).transpose(1, 2, 0),
    )
    assert out["image"]["right_wrist_0_rgb"].shape == (6, 8, 3)
    assert out["image"]["right_wrist_0_rgb"].max() == 0
    assert {k: bool(v) for k, v in out["image_mask"].items()} == {
        "base_0_rgb": True,
        "left_wrist_0_rgb": True,
        "right_wrist_0_rgb": False,
    }
    assert out["prompt"] == "fold the towel"
    np.testing.assert_array_equal(sample["state"], np.linspace(-0.6, 0.7, 14))  # input untouched
    # Without adapt_to_pi, state and actions pass unchanged.
    plain = AlohaInputs(adapt_to_pi=False)(sample)
    np.testing.assert_allclose(plain["state"], state, rtol=1e-6)
    np.testing.assert_allclose(plain["actions"], actions, rtol=1e-6)


def test_aloha_inputs_errors():
    sample = _aloha_sample()
    sample["images"]["cam_top"] = sample["images"].pop("cam_low")
    with pytest.raises(ValueError, match="cameras must be among"):
        AlohaInputs()(sample)
    sample = _aloha_sample()
    del sample["images"]["cam_high"]
    with pytest.raises(ValueError, match="'cam_high' is required"):
        AlohaInputs()(sample)
    sample = _aloha_sample()
    sample["state"] = np.zeros(7)
    with pytest.raises(
        ValueError, match="ALOHA 'state' must have shape \\(..., 14\\), got shape \\(7,\\)"
    ):
        AlohaInputs()(sample)


def test_aloha_outputs():
    model_actions = np.zeros((2, 32))
    model_actions[:, :14] = np.linspace(-1, 1, 14)
    model_actions[:, 14:] = 9.0  # padding, dropped
    out = AlohaOutputs()({"actions": model_actions, "state": np.zeros(32)})
    assert sorted(out) == ["actions"] and out["actions"].shape == (2, 14)
    flips = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])
    expected = flips * np.linspace(-1, 1, 14)
    expected[[6, 13]] = (np.linspace(-1, 1, 14)[[6, 13]] + 0.5476 + 0.6213) / 2.1123
    np.testing.assert_allclose(out["actions"][1], expected, rtol=1e-6)
    # Outputs undo the inputs' action conversion.
    sample = _aloha_sample()
    round_trip = AlohaOutputs()(AlohaInputs()(sample))
    np.testing.assert_allclose(round_trip["actions"], sample["actions"], atol=1e-6)


def test_aloha_delta_actions_pipeline():
    inputs, outputs = get_robot("aloha", delta_actions=True)
    assert isinstance(inputs[1], DeltaActions) and isinstance(outputs[0], AbsoluteActions)
    assert aloha.DELTA_ACTION_MASK == (True,) * 6 + (False,) + (True,) * 6 + (False,)
    sample = _aloha_sample()
    model_sample = compose(inputs)(sample)
    converted = AlohaInputs()(sample)
    expected = converted["actions"] - np.where(aloha.DELTA_ACTION_MASK, converted["state"], 0.0)
    np.testing.assert_allclose(model_sample["actions"], expected, rtol=1e-6)
    back = compose(outputs)({"actions": model_sample["actions"], "state": model_sample["state"]})
    np.testing.assert_allclose(back["actions"], sample["actions"], atol=1e-5)


# === DROID ===


def test_droid_inputs_pi0_and_fast_layouts():
    example = droid.make_droid_example()
    example["observation/gripper_position"] = np.float64(0.25)  # scalars are accepted
    example["prompt"] = b"open the drawer"
    example["actions"] = np.ones((10, 8))
    out = DroidInputs("pi0")(example)
    np.testing.assert_allclose(
        out["state"], np.concatenate([example["observation/joint_position"], [0.25]]), rtol=1e-6
    )
    assert out["prompt"] == "open the drawer"
    assert out["actions"].shape == (10, 8)
    images = out["image"]
    assert list(images) == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    np.testing.assert_array_equal(
        images["base_0_rgb"], example["observation/exterior_image_1_left"]
    )
    np.testing.assert_array_equal(
        images["left_wrist_0_rgb"], example["observation/wrist_image_left"]
    )
    assert images["right_wrist_0_rgb"].max() == 0
    assert [bool(m) for m in out["image_mask"].values()] == [True, True, False]
    fast = DroidInputs("pi0_fast")(example)
    assert list(fast["image"]) == ["base_0_rgb", "base_1_rgb", "wrist_0_rgb"]
    np.testing.assert_array_equal(
        fast["image"]["wrist_0_rgb"], example["observation/wrist_image_left"]
    )
    assert [bool(m) for m in fast["image_mask"].values()] == [True, True, True]
    # LeRobot's float CHW images are parsed to uint8 HWC.
    example["observation/exterior_image_1_left"] = np.full((3, 4, 5), 0.5, np.float32)
    assert DroidInputs("pi05")(example)["image"]["base_0_rgb"].shape == (4, 5, 3)
    with pytest.raises(ValueError, match="model_type must be one of"):
        DroidInputs("pi1")
    with pytest.raises(ValueError, match="no 'observation/joint_position'"):
        DroidInputs()({"prompt": "x"})


def test_droid_and_libero_outputs_keep_the_robot_dims():
    actions = np.arange(2 * 10 * 32, dtype=np.float32).reshape(2, 10, 32)
    np.testing.assert_array_equal(DroidOutputs()({"actions": actions})["actions"], actions[..., :8])
    out = LiberoOutputs()({"actions": actions[0], "state": np.zeros(32)})
    assert sorted(out) == ["actions"]
    np.testing.assert_array_equal(out["actions"], actions[0, :, :7])


# === LIBERO and raw ===


def test_libero_inputs():
    example = libero.make_libero_example()
    example["actions"] = np.ones((50, 7))
    out = LiberoInputs("pi05")(example)
    np.testing.assert_allclose(out["state"], example["observation/state"], rtol=1e-6)
    np.testing.assert_array_equal(out["image"]["base_0_rgb"], example["observation/image"])
    np.testing.assert_array_equal(
        out["image"]["left_wrist_0_rgb"], example["observation/wrist_image"]
    )
    assert out["image"]["right_wrist_0_rgb"].max() == 0
    assert [bool(m) for m in out["image_mask"].values()] == [True, True, False]
    assert out["actions"].shape == (50, 7) and out["prompt"] == "do something"
    fast = LiberoInputs("pi0_fast")(example)
    assert bool(fast["image_mask"]["right_wrist_0_rgb"])
    with pytest.raises(ValueError, match="no 'observation/wrist_image'"):
        LiberoInputs()({"observation/state": np.zeros(8), "observation/image": np.zeros((4, 4, 3))})


def test_raw_robot_and_registry():
    inputs, outputs = get_robot("raw")
    sample = {
        "image": {"base_0_rgb": np.full((3, 4, 4), 1.0, np.float32)},
        "image_mask": {},
        "state": [0.5, 1.0],
        "prompt": "go",
    }
    out = compose(inputs)(sample)
    assert out["image"]["base_0_rgb"].shape == (4, 4, 3) and out["image"]["base_0_rgb"].max() == 255
    assert bool(out["image_mask"]["base_0_rgb"]) and out["state"].tolist() == [0.5, 1.0]
    assert compose(outputs)({"actions": np.ones((2, 3)), "state": 0})["actions"].shape == (2, 3)
    with pytest.raises(ValueError, match="RawInputs: the sample has no 'state'"):
        RawInputs()({"image": {"a": np.zeros((2, 2, 3), np.uint8)}})
    with pytest.raises(
        ValueError,
        match="unknown robot 'ur5'; choose one of \\('aloha', 'droid', 'libero', 'metaworld', 'raw'\\)",
    ):
        get_robot("ur5")
    with pytest.raises(ValueError, match="robot 'raw' has no delta-action mask"):
        get_robot("raw", delta_actions=True)
    libero_in, _ = get_robot("libero", model_type="pi0_fast", delta_actions=True)
    assert libero_in[0].model_type == "pi0_fast" and libero_in[1].mask == (True,) * 6 + (False,)
