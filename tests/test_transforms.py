"""Data transforms (openpi's transforms.py) and training-time image augmentation."""

import math

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_openpi.layers import image_augmentation as augment
from keras_openpi.data.image_tools import resize_with_pad
from keras_openpi.data.image_tools import to_uint8_hwc
from keras_openpi.data.normalize import NormStats
from keras_openpi.data.transforms import AbsoluteActions
from keras_openpi.data.transforms import DeltaActions
from keras_openpi.data.transforms import Group
from keras_openpi.data.transforms import InjectDefaultPrompt
from keras_openpi.data.transforms import Normalize
from keras_openpi.data.transforms import PadStatesAndActions
from keras_openpi.data.transforms import PromptFromLeRobotTask
from keras_openpi.data.transforms import Repack
from keras_openpi.data.transforms import ResizeImages
from keras_openpi.data.transforms import SubsampleActions
from keras_openpi.data.transforms import Unnormalize
from keras_openpi.data.transforms import transform_dict
from keras_openpi.data.transforms import compose
from keras_openpi.data.transforms import flatten_dict
from keras_openpi.data.transforms import make_bool_mask
from keras_openpi.data.transforms import unflatten_dict

# === Structure ===


def test_flatten_and_unflatten_are_inverse():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    flat = flatten_dict(tree)
    assert flat == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert unflatten_dict(flat) == tree


def test_repack_picks_leaves_by_path():
    sample = {
        "observation.images.top": np.zeros((3, 2, 2)),
        "observation.state": np.arange(14.0),
        "action": np.ones((5, 14)),
        "nested": {"task": "fold"},
        "episode_index": 7,
    }
    repack = Repack(
        {
            "images": {"cam_high": "observation.images.top"},
            "state": "observation.state",
            "actions": "action",
            "prompt": "nested/task",
        }
    )
    out = repack(sample)
    assert sorted(out) == ["actions", "images", "prompt", "state"]
    assert out["images"]["cam_high"] is sample["observation.images.top"]
    assert out["prompt"] == "fold"
    np.testing.assert_array_equal(out["state"], np.arange(14.0))
    with pytest.raises(ValueError, match="no key 'observation.state'.*wanted for 'x'"):
        Repack({"x": "observation.state"})({"action": 1})


def test_group_push_and_compose_order():
    calls = []

    def tag(name):
        def transform(data):
            calls.append(name)
            return {**data, name: True}

        return transform

    group = Group([tag("a")], [tag("z")]).push(inputs=[tag("b")], outputs=[tag("y")])
    assert compose(group.inputs)({}) == {"a": True, "b": True}
    compose(group.outputs)({})
    assert calls == ["a", "b", "y", "z"]
    inputs, outputs = group
    assert len(inputs) == 2 and len(outputs) == 2


# === Prompts ===


def test_inject_default_prompt():
    sample = {"state": np.zeros(2)}
    out = InjectDefaultPrompt("fold the towel")(sample)
    assert out["prompt"] == "fold the towel"
    assert "prompt" not in sample  # the input is untouched
    assert InjectDefaultPrompt("x")({"prompt": "keep"})["prompt"] == "keep"
    assert InjectDefaultPrompt(None)(sample) == sample


def test_prompt_from_lerobot_task():
    transform = PromptFromLeRobotTask({0: "pick", 3: "place"})
    assert transform({"task_index": np.array(3)})["prompt"] == "place"
    with pytest.raises(
        ValueError, match="task_index 5 is not among the dataset's tasks \\[0, 3\\]"
    ):
        transform({"task_index": 5})
    with pytest.raises(ValueError, match="no 'task_index'"):
        transform({"state": 1})


# === Actions and padding ===


def test_make_bool_mask():
    assert make_bool_mask(2, -2, 2) == (True, True, False, False, True, True)
    assert make_bool_mask(6, -1) == (True,) * 6 + (False,)
    assert make_bool_mask(2, 0, 2) == (True,) * 4


def test_delta_and_absolute_actions_by_mask():
    state = np.array([1.0, 2.0, 3.0, 4.0])
    actions = np.array([[2.0, 3.0, 4.0, 5.0], [5.0, 5.0, 5.0, 5.0]])
    sample = {"state": state, "actions": actions}
    mask = make_bool_mask(1, -1, 1)  # dims 0 and 2 relative, dim 1 absolute, dim 3 untouched
    delta = DeltaActions(mask)(sample)
    np.testing.assert_allclose(delta["actions"], [[1.0, 3.0, 1.0, 5.0], [4.0, 5.0, 2.0, 5.0]])
    np.testing.assert_array_equal(sample["actions"][0], [2.0, 3.0, 4.0, 5.0])  # not modified
    back = AbsoluteActions(mask)(delta)
    np.testing.assert_allclose(back["actions"], actions)
    # No actions (inference) or no mask: no-op.
    assert DeltaActions(mask)({"state": state}) == {"state": state}
    assert DeltaActions(None)(sample) is sample
    with pytest.raises(ValueError, match="mask covers 5 dims but 'state' has only 4"):
        DeltaActions(make_bool_mask(5))(sample)


def test_pad_states_and_actions():
    out = PadStatesAndActions(5)({"state": np.array([1.0, 2.0]), "actions": np.ones((3, 2))})
    np.testing.assert_array_equal(out["state"], [1.0, 2.0, 0.0, 0.0, 0.0])
    assert out["actions"].shape == (3, 5)
    np.testing.assert_array_equal(out["actions"][:, 2:], 0.0)
    assert PadStatesAndActions(5)({"state": np.ones(2)})["state"].shape == (5,)
    with pytest.raises(
        ValueError, match="'actions' has 7 dims, more than the model's action_dim 5"
    ):
        PadStatesAndActions(5)({"state": np.ones(2), "actions": np.ones((3, 7))})


# === Images ===


def test_resize_with_pad_downscale_matches_pillow_arithmetic():
    # 4 -> 2 columns: Pillow's triangle filter widened to support 2 gives taps
    # (3/7, 3/7, 1/7) and (1/7, 3/7, 3/7), in 22-bit fixed point with +2**21 rounding:
    # (0*3 + 70*3 + 140*1) / 7 = 50.0 and (70*1 + 140*3 + 210*3) / 7 = 160.0.
    row = np.array([0, 70, 140, 210], dtype=np.uint8)
    image = np.broadcast_to(row[None, :, None], (4, 4, 3)).copy()
    out = resize_with_pad(image, 2, 2)
    np.testing.assert_array_equal(out[..., 0], [[50, 160], [50, 160]])
    assert out.dtype == np.uint8


def test_resize_with_pad_upscale_and_padding():
    # 2 -> 4 columns: taps 1, (3/4, 1/4), (1/4, 3/4), 1 → 0, 50.5→50, 150.5→150, 200.
    image = np.broadcast_to(np.array([0, 200], np.uint8)[None, :, None], (2, 2, 3)).copy()
    np.testing.assert_array_equal(resize_with_pad(image, 4, 4)[0, :, 0], [0, 50, 150, 200])
    # A (4, 8) image fits a (4, 4) box as (2, 4), pasted at row int((4 - 2) / 2) = 1.
    wide = np.full((4, 8, 3), 90, np.uint8)
    out = resize_with_pad(wide, 4, 4)
    np.testing.assert_array_equal(out[:, :, 1], [[0] * 4, [90] * 4, [90] * 4, [0] * 4])
    # Batched input, and images already at the target size come back unchanged.
    batch = np.stack([wide, wide])
    assert resize_with_pad(batch, 4, 4).shape == (2, 4, 4, 3)
    assert resize_with_pad(wide, 4, 8) is wide
    with pytest.raises(ValueError, match="'images' must be uint8 images"):
        resize_with_pad(np.zeros((4, 4, 3), np.float32), 2, 2)


def test_resize_images_transform():
    sample = {"image": {"base_0_rgb": np.full((480, 640, 3), 255, np.uint8)}, "state": np.zeros(2)}
    out = ResizeImages(224, 224)(sample)["image"]["base_0_rgb"]
    # 640x480 → 224x168, padded by (224 - 168) / 2 = 28 rows above and below.
    assert out.shape == (224, 224, 3)
    assert out[:28].max() == 0 and out[196:].max() == 0
    assert out[28:196].min() == 255


def test_to_uint8_hwc():
    chw = np.zeros((3, 4, 5), np.float32)
    chw[0] = 0.5
    out = to_uint8_hwc(chw)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [127, 0, 0]  # 255 * 0.5 truncated, as openpi
    hwc = np.ones((4, 5, 3), np.uint8)
    assert to_uint8_hwc(hwc) is hwc
    with pytest.raises(ValueError, match="must be one RGB image"):
        to_uint8_hwc(np.zeros((4, 5)))


# === Normalization ===

STATS = {
    "state": NormStats(
        mean=[1.0, 2.0, 3.0], std=[2.0, 4.0, 0.5], q01=[0.0, -2.0, 1.0], q99=[2.0, 6.0, 2.0]
    ),
    "actions": NormStats(mean=[1.0, 2.0], std=[2.0, 4.0], q01=[0.0, -2.0], q99=[2.0, 6.0]),
}


def test_normalize_z_score_and_quantile():
    sample = {
        "state": np.array([3.0, 2.0, 4.0], np.float32),
        "actions": np.array([[1.0, 6.0]]),
        "x": 1,
    }
    z = Normalize(STATS)(sample)
    np.testing.assert_allclose(z["state"], [2.0 / (2 + 1e-6), 0.0, 1.0 / (0.5 + 1e-6)], rtol=1e-6)
    assert z["state"].dtype == np.float64  # float64 stats promote, as in openpi
    np.testing.assert_allclose(z["actions"], [[0.0, 4.0 / (4 + 1e-6)]])
    assert z["x"] == 1
    q = Normalize(STATS, use_quantiles=True)(sample)
    # (x - q01) / (q99 - q01 + 1e-6) * 2 - 1
    np.testing.assert_allclose(
        q["state"],
        [3 / (2 + 1e-6) * 2 - 1, 4 / (8 + 1e-6) * 2 - 1, 3 / (1 + 1e-6) * 2 - 1],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(sample["state"], [3.0, 2.0, 4.0])  # input untouched


def test_normalize_truncates_wider_stats_and_rejects_narrower():
    out = Normalize(STATS)({"state": np.array([3.0, 2.0])})  # stats have 3 dims
    np.testing.assert_allclose(out["state"], [2 / (2 + 1e-6), 0.0])
    with pytest.raises(ValueError, match="'state' has 4 dims but its norm stats have 3"):
        Normalize(STATS)({"state": np.zeros(4)})


def test_unnormalize_pads_stats_as_openpi():
    # z-score: stats padded with mean 0, std 1 past their 2 dims.
    out = Unnormalize(STATS)({"actions": np.array([[1.0, 1.0, 1.0]]), "state": np.zeros(3)})
    np.testing.assert_allclose(out["actions"], [[1 * (2 + 1e-6) + 1, 1 * (4 + 1e-6) + 2, 1 + 1e-6]])
    # quantile: (x + 1) / 2 * (q99 - q01 + 1e-6) + q01 on 2 dims, the third passes through.
    out = Unnormalize(STATS, use_quantiles=True)(
        {"actions": np.array([[0.0, 1.0, 7.0]]), "state": np.zeros(3)}
    )
    np.testing.assert_allclose(out["actions"], [[0.5 * (2 + 1e-6), 1.0 * (8 + 1e-6) - 2, 7.0]])
    with pytest.raises(
        ValueError, match="norm stats key 'state' is not in the outputs \\['actions'\\]"
    ):
        Unnormalize(STATS)({"actions": np.zeros((1, 2))})
    assert "state" not in Unnormalize(STATS, strict=False)({"actions": np.zeros((1, 2))})


@pytest.mark.parametrize("use_quantiles", [False, True])
def test_normalize_then_unnormalize_round_trips(use_quantiles):
    sample = {"state": np.array([0.3, -1.0, 2.5]), "actions": np.array([[0.1, 0.2], [3.0, -4.0]])}
    back = Unnormalize(STATS, use_quantiles)(Normalize(STATS, use_quantiles)(sample))
    np.testing.assert_allclose(back["state"], sample["state"], atol=1e-12)
    np.testing.assert_allclose(back["actions"], sample["actions"], atol=1e-12)


def test_normalize_nested_keys_and_checks():
    stats = {"observation/state": NormStats(mean=[1.0], std=[1.0])}
    sample = {"observation": {"state": np.array([3.0]), "other": 1}}
    out = Normalize(stats)(sample)
    np.testing.assert_allclose(out["observation"]["state"], [2 / (1 + 1e-6)])
    assert out["observation"]["other"] == 1 and sample["observation"]["state"][0] == 3.0
    with pytest.raises(ValueError, match="norm stats of 'observation/state' have none"):
        Normalize(stats, use_quantiles=True)
    with pytest.warns(UserWarning, match="'gripper' dimension 1 has a near-zero range"):
        Normalize({"gripper": NormStats(mean=[0.0, 1.0], std=[1.0, 0.0])})


def test_normalize_strict_needs_every_stats_key():
    sample = {"state": np.array([3.0, 2.0, 4.0])}
    assert "actions" not in Normalize(STATS)(sample)  # openpi's default: missing keys pass
    with pytest.raises(
        ValueError,
        match="Normalize: norm stats key 'actions' is not in the sample \\['state'\\] \\(strict",
    ):
        Normalize(STATS, strict=True)(sample)
    out = Normalize(STATS, strict=True)({**sample, "actions": np.array([[1.0, 2.0]])})
    np.testing.assert_allclose(out["actions"], [[0.0, 0.0]])


# === Restructuring ===


def test_transform_dict_as_openpi():
    # openpi's own cases (transforms_test.py): rename and remove, conflicts, full matches,
    # removal by regex, backreferences.
    tree = {"a": {"b": 1, "c": 2}}
    assert transform_dict({"a/b": "a/c", "a/c": None}, tree) == {"a": {"c": 1}}
    with pytest.raises(
        ValueError, match="key 'a/c' already exists in the output \\(from 'a/b' and 'a/c'\\)"
    ):
        transform_dict({"a/b": "a/c"}, tree)
    assert transform_dict({"a": None}, tree) == tree
    assert transform_dict({"a.+": None}, tree) == {}
    tree = {"a": {"b": 1, "c": 1}, "b": {"c": 2}}
    assert transform_dict({"(.+)/c": r"\1/d"}, tree) == {"a": {"b": 1, "d": 1}, "b": {"d": 2}}
    assert tree == {"a": {"b": 1, "c": 1}, "b": {"c": 2}}  # input untouched


def test_transform_dict_first_pattern_wins_and_errors():
    tree = {"images": {"top": 1, "wrist": 2}, "state": 3}
    patterns = {"images/top": "image/base_0_rgb", "images/(.+)": r"image/\1_rgb"}
    assert transform_dict(patterns, tree) == {
        "image": {"base_0_rgb": 1, "wrist_rgb": 2},
        "state": 3,
    }
    with pytest.raises(ValueError, match="leaf 'state' aliases a node of 'state/x'"):
        transform_dict({"images/top": "state/x"}, tree)
    with pytest.raises(ValueError, match="pattern '\\(' is not a regular expression"):
        transform_dict({"(": None}, tree)


def test_subsample_actions():
    sample = {"actions": np.arange(10).reshape(5, 2), "state": np.zeros(2)}
    out = SubsampleActions(2)(sample)
    np.testing.assert_array_equal(out["actions"], [[0, 1], [4, 5], [8, 9]])
    assert sample["actions"].shape == (5, 2) and out["state"] is sample["state"]
    np.testing.assert_array_equal(SubsampleActions(1)(sample)["actions"], sample["actions"])
    assert SubsampleActions(3)({"state": 1}) == {"state": 1}  # inference: no actions
    with pytest.raises(ValueError, match="'stride' must be a positive int, got 0"):
        SubsampleActions(0)


# === Augmentation ===


def _images(seed, batch=2, size=16):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)


NO_JITTER = dict(brightness=0.0, contrast=0.0, hue=0.0, saturation=0.0)


def test_augment_disabled_is_the_identity():
    images = {"base_0_rgb": _images(0), "left_wrist_0_rgb": _images(1)}
    out = augment.augment_images(images, 0, crop_scale=1.0, max_rotation_degrees=0.0, **NO_JITTER)
    for key in images:
        # float32 HSV round trip: exact up to rounding
        np.testing.assert_allclose(keras.ops.convert_to_numpy(out[key]), images[key], atol=1e-5)


def test_crop_resize_rotate_geometry():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1).repeat(3, axis=-1) / 16
    zero = np.zeros(1, np.float32)
    # A one-pixel shift down: row i samples row i + 1; the last row falls outside (0).
    shifted = augment.crop_resize_rotate(image, np.ones(1, np.float32), zero, zero, crop_scale=1.0)
    expected = np.concatenate([image[:, 1:], np.zeros((1, 1, 4, 3))], axis=1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(shifted), expected, atol=1e-6)
    # 90 degrees: out[i, j] = in[j, 3 - i], numpy's rot90.
    rotated = augment.crop_resize_rotate(
        image, zero, zero, np.full(1, math.pi / 2, np.float32), crop_scale=1.0
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(rotated), np.rot90(image, 1, axes=(1, 2)), atol=1e-5
    )
    # A centred half-size crop resized back samples rows 0.75, 1.25, 1.75, 2.25.
    rows = np.broadcast_to(np.arange(4, dtype=np.float32)[None, :, None, None], (1, 4, 4, 3))
    zoomed = augment.crop_resize_rotate(rows, zero, zero, zero, crop_scale=0.5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(zoomed)[0, :, 1, 0], [0.75, 1.25, 1.75, 2.25], atol=1e-6
    )


def test_color_jitter_operations():
    rng = np.random.default_rng(0)
    colors = rng.uniform(0, 1, (50, 3)).astype(np.float32)
    h, s, v = augment.rgb_to_hsv(colors)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(augment.hsv_to_rgb(h, s, v)), colors, atol=1e-6
    )
    # Brightness: v (1 - b) + b for b > 0, v (1 + b) for b < 0.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(augment.adjust_brightness(0.5, 0.2)), 0.6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(augment.adjust_brightness(0.5, -0.2)), 0.4
    )
    # Contrast 0.2: slope tan(0.3 pi); 0.6 is on the middle line, 0.1 below p1 = s / (2 (1 + s)).
    slope = math.tan(1.2 * math.pi / 4)
    out = keras.ops.convert_to_numpy(augment.adjust_contrast(np.array([0.6, 0.1, 0.5]), 0.2))
    np.testing.assert_allclose(out, [slope * 0.1 + 0.5, 0.1 / slope, 0.5], rtol=1e-6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(augment.adjust_contrast(np.array([0.1, 0.9]), 0.0)), [0.1, 0.9]
    )
    # Hue + 1/3 turns red into green; an example drawn above the probability is untouched.
    red = np.zeros((2, 1, 1, 3), np.float32)
    red[..., 0] = 1.0
    params = np.zeros((2, 8), np.float32)
    params[:, augment._HUE] = 1.0  # amount = (2 * 1 - 1) * strength
    params[1, augment._APPLY] = 0.7
    out = keras.ops.convert_to_numpy(
        augment.color_jitter(red, params, brightness=0, contrast=0, hue=1 / 3, probability=0.5)
    )
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[1, 0, 0], [1.0, 0.0, 0.0])


def test_augment_is_deterministic_per_seed():
    images = {"base_0_rgb": _images(2, batch=4)}
    first = augment.augment_images(images, keras.random.SeedGenerator(7))["base_0_rgb"]
    again = augment.augment_images(images, keras.random.SeedGenerator(7))["base_0_rgb"]
    first = keras.ops.convert_to_numpy(first)
    np.testing.assert_array_equal(first, keras.ops.convert_to_numpy(again))
    assert first.shape == (4, 16, 16, 3)
    assert first.min() >= -1.0 - 1e-5 and first.max() <= 1.0 + 1e-5
    # The generator moves on between calls.
    generator = keras.random.SeedGenerator(7)
    augment.augment_images(images, generator)
    later = keras.ops.convert_to_numpy(augment.augment_images(images, generator)["base_0_rgb"])
    assert not np.allclose(later, first)


def test_augment_geometry_only_for_non_wrist_cameras():
    image = _images(3)
    out = augment.augment_images({"base_0_rgb": image, "left_wrist_0_rgb": image}, 11, **NO_JITTER)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out["left_wrist_0_rgb"]), image, atol=1e-5
    )
    assert np.abs(keras.ops.convert_to_numpy(out["base_0_rgb"]) - image).mean() > 0.05


def test_augment_compiles_with_jax_jit_and_shares_draws_per_camera_group():
    same = np.repeat(_images(4, batch=1), 3, axis=0)  # three copies of one image
    images = {"base_0_rgb": same, "base_1_rgb": same, "left_wrist_0_rgb": same}
    seed = jnp.array([0, 42], dtype=jnp.uint32)
    compiled = jax.jit(augment.augment_images)(images, seed)
    out = {k: np.asarray(v) for k, v in compiled.items()}
    eager = augment.augment_images({"left_wrist_0_rgb": same}, seed)["left_wrist_0_rgb"]
    np.testing.assert_allclose(out["left_wrist_0_rgb"], np.asarray(eager), atol=1e-5)
    # openpi gives every non-wrist camera the same draw, and every wrist camera another.
    np.testing.assert_array_equal(out["base_0_rgb"], out["base_1_rgb"])
    assert not np.allclose(out["base_0_rgb"], out["left_wrist_0_rgb"])
    # Each example gets its own draw: the same image augments differently across the batch.
    assert not np.allclose(out["base_0_rgb"][0], out["base_0_rgb"][1])


class _AugmentingModel(keras.Model):
    """Augments its cameras while training, as Pi0 will (seed generator owned by the model)."""

    def __init__(self):
        super().__init__()
        self.seed_generator = keras.random.SeedGenerator(0)
        self.head = keras.layers.Dense(1)

    def call(self, images, training=False):
        if training:
            images = augment.augment_images(images, self.seed_generator)
        pooled = [keras.ops.mean(images[k], axis=(1, 2)) for k in sorted(images)]
        return self.head(keras.ops.concatenate(pooled, axis=-1))


def test_augment_runs_inside_a_compiled_fit_step():
    model = _AugmentingModel()
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    images = {"base_0_rgb": _images(6, batch=4), "left_wrist_0_rgb": _images(7, batch=4)}
    state = keras.ops.convert_to_numpy(model.seed_generator.state)
    history = model.fit(images, np.zeros((4, 1)), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # The generator advanced once per step, inside the compiled step.
    assert not np.array_equal(keras.ops.convert_to_numpy(model.seed_generator.state), state)
