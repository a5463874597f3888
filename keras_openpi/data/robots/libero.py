"""LIBERO (simulated Franka, 8-dim state, 7-dim actions): openpi's `libero_policy.py` mapping.

This is also openpi's template for a new robot: copy it and change the keys
and the action width.
"""

import dataclasses

import numpy as np

from keras_openpi.data.image_tools import to_uint8_hwc
from keras_openpi.data.robots.droid import check_model_type
from keras_openpi.data.transforms import make_bool_mask

ACTION_DIM = 7
# openpi's `LeRobotLiberoDataConfig(extra_delta_transform=True)`: 6 deltas, gripper absolute.
DELTA_ACTION_MASK = make_bool_mask(6, -1)
# openpi's repacking of LeRobot LIBERO datasets (physical-intelligence/libero).
LEROBOT_REPACK = {
    "observation/image": "image",
    "observation/wrist_image": "wrist_image",
    "observation/state": "state",
    "actions": "actions",
    "prompt": "prompt",
}


@dataclasses.dataclass(frozen=True)
class LiberoInputs:
    """LIBERO observation → model sample (openpi's `LiberoInputs`).

    Expects `observation/state` (8,), `observation/image` and
    `observation/wrist_image` (HWC uint8, or LeRobot's float CHW), optional
    `actions` and `prompt`. Cameras: `base_0_rgb` = image, `left_wrist_0_rgb` =
    wrist image, `right_wrist_0_rgb` black (mask False, True for π0-FAST).

    Args:
        model_type: `pi0`, `pi05` or `pi0_fast`.
    """

    model_type: str = "pi0"

    def __post_init__(self):
        check_model_type(self.model_type)

    def __call__(self, data):
        for key in ("observation/state", "observation/image", "observation/wrist_image"):
            if key not in data:
                raise ValueError(f"LiberoInputs: the sample has no {key!r}; it has {sorted(data)}.")
        base = to_uint8_hwc(data["observation/image"], "observation/image")
        wrist = to_uint8_hwc(data["observation/wrist_image"], "observation/wrist_image")
        out = {
            "state": np.asarray(data["observation/state"]),
            "image": {
                "base_0_rgb": base,
                "left_wrist_0_rgb": wrist,
                "right_wrist_0_rgb": np.zeros_like(base),
            },
            "image_mask": {
                "base_0_rgb": np.True_,
                "left_wrist_0_rgb": np.True_,
                "right_wrist_0_rgb": np.bool_(self.model_type == "pi0_fast"),
            },
        }
        if "actions" in data:
            out["actions"] = np.asarray(data["actions"])
        if "prompt" in data:
            out["prompt"] = data["prompt"]
        return out


@dataclasses.dataclass(frozen=True)
class LiberoOutputs:
    """Model actions → LIBERO's 7 dims (6 end-effector deltas, gripper)."""

    def __call__(self, data):
        return {"actions": np.asarray(data["actions"])[..., :ACTION_DIM]}


def make_libero_example(seed=0):
    """A random LIBERO observation, like openpi's `make_libero_example`."""
    rng = np.random.default_rng(seed)
    return {
        "observation/state": rng.random(8),
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "prompt": "do something",
    }
