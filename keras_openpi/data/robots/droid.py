"""DROID (Franka arm, 7 joints + gripper): openpi's `droid_policy.py` mapping."""

import dataclasses

import numpy as np

from keras_openpi.data.image_tools import to_uint8_hwc
from keras_openpi.data.transforms import make_bool_mask

MODEL_TYPES = ("pi0", "pi05", "pi0_fast")
ACTION_DIM = 8
# openpi's `RLDSDroidDataConfig` with joint-position actions: joints as deltas, gripper absolute.
DELTA_ACTION_MASK = make_bool_mask(7, -1)
# openpi's `LeRobotDROIDDataConfig` repacking (joint-velocity actions, no deltas).
LEROBOT_REPACK = {
    "observation/exterior_image_1_left": "exterior_image_1_left",
    "observation/exterior_image_2_left": "exterior_image_2_left",
    "observation/wrist_image_left": "wrist_image_left",
    "observation/joint_position": "joint_position",
    "observation/gripper_position": "gripper_position",
    "actions": "actions",
    "prompt": "prompt",
}


def check_model_type(model_type):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
    return model_type


@dataclasses.dataclass(frozen=True)
class DroidInputs:
    """DROID observation → model sample (openpi's `DroidInputs`).

    Expects `observation/joint_position` (7,), `observation/gripper_position`
    (1,) or scalar, `observation/exterior_image_1_left` and
    `observation/wrist_image_left` (HWC uint8, or LeRobot's float CHW),
    optional `actions` and `prompt` (str or bytes). π0 / π0.5 get cameras
    `base_0_rgb` = exterior, `left_wrist_0_rgb` = wrist and a black
    `right_wrist_0_rgb` (mask False); π0-FAST gets `base_0_rgb` = exterior, a
    black `base_1_rgb` and `wrist_0_rgb` = wrist, all masks True.

    Args:
        model_type: `pi0`, `pi05` or `pi0_fast`.
    """

    model_type: str = "pi0"

    def __post_init__(self):
        check_model_type(self.model_type)

    def __call__(self, data):
        keys = (
            "observation/joint_position",
            "observation/gripper_position",
            "observation/exterior_image_1_left",
            "observation/wrist_image_left",
        )
        for key in keys:
            if key not in data:
                raise ValueError(f"DroidInputs: the sample has no {key!r}; it has {sorted(data)}.")
        gripper = np.asarray(data["observation/gripper_position"]).reshape(-1)
        joints = np.asarray(data["observation/joint_position"])
        state = np.concatenate([joints, gripper])
        if state.shape != (ACTION_DIM,):
            raise ValueError(
                f"DroidInputs: joint_position (7,) and gripper_position (1,) must give a state "
                f"of 8 dims, got shapes {joints.shape} and {gripper.shape}."
            )
        base = to_uint8_hwc(
            data["observation/exterior_image_1_left"], "observation/exterior_image_1_left"
        )
        wrist = to_uint8_hwc(data["observation/wrist_image_left"], "observation/wrist_image_left")
        black = np.zeros_like(base)
        if self.model_type == "pi0_fast":
            names = ("base_0_rgb", "base_1_rgb", "wrist_0_rgb")
            images, masks = (base, black, wrist), (True, True, True)
        else:
            names = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
            images, masks = (base, wrist, black), (True, True, False)
        out = {
            "state": state,
            "image": dict(zip(names, images)),
            "image_mask": {name: np.bool_(mask) for name, mask in zip(names, masks)},
        }
        if "actions" in data:
            out["actions"] = np.asarray(data["actions"])
        if "prompt" in data:
            prompt = data["prompt"]
            out["prompt"] = prompt.decode("utf-8") if isinstance(prompt, bytes) else prompt
        return out


@dataclasses.dataclass(frozen=True)
class DroidOutputs:
    """Model actions → DROID's 8 dims (7 joint velocities or positions, gripper)."""

    def __call__(self, data):
        return {"actions": np.asarray(data["actions"])[..., :ACTION_DIM]}


def make_droid_example(seed=0):
    """A random DROID observation, like openpi's `make_droid_example`."""
    rng = np.random.default_rng(seed)
    return {
        "observation/exterior_image_1_left": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/joint_position": rng.random(7),
        "observation/gripper_position": rng.random(1),
        "prompt": "do something",
    }
