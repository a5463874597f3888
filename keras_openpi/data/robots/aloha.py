"""ALOHA (bimanual Trossen arms): openpi's `aloha_policy.py` mapping.

State and actions are 14 dims: `[left arm joints (6), left gripper, right arm
joints (6), right gripper]`. With `adapt_to_pi` (openpi's default) they are
converted between the ALOHA runtime's space and the space of π's internal
runtime that the base models were trained in: joints 1, 2, 8, 9 change sign,
and the grippers change between ALOHA's linear positions and π's angular
range.
"""

import dataclasses

import numpy as np

from keras_openpi.data.image_tools import to_uint8_hwc
from keras_openpi.data.transforms import make_bool_mask

EXPECTED_CAMERAS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
# Model camera ← ALOHA camera. `cam_high` is required; `cam_low` is accepted but unused.
CAMERA_MAP = {
    "base_0_rgb": "cam_high",
    "left_wrist_0_rgb": "cam_left_wrist",
    "right_wrist_0_rgb": "cam_right_wrist",
}
JOINT_FLIP_MASK = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])
GRIPPER_DIMS = [6, 13]
STATE_DIM = 14
# openpi's `LeRobotAlohaDataConfig`: joints as deltas to the state, grippers absolute.
DELTA_ACTION_MASK = make_bool_mask(6, -1, 6, -1)
# openpi's repacking of LeRobot ALOHA datasets (e.g. lerobot/aloha_sim_transfer_cube_human).
LEROBOT_REPACK = {
    "images": {"cam_high": "observation.images.top"},
    "state": "observation.state",
    "actions": "action",
}

# ALOHA's puppet gripper positions (m), Interbotix linkage (m), π's gripper
# range (rad; encoder counts 2405..3110 of 4096 around 2048) and ALOHA's
# puppet gripper joint range (rad).
_GRIPPER_OPEN, _GRIPPER_CLOSED = 0.01844, 0.05800
_ARM_LENGTH, _HORN_RADIUS = 0.036, 0.022
_PI_GRIPPER_MIN, _PI_GRIPPER_MAX = 0.5476, 1.6296
_JOINT_OPEN, _JOINT_CLOSED = -0.6213, 1.4910


def _to_unit(x, low, high):
    return (x - low) / (high - low)


def _from_unit(x, low, high):
    return x * (high - low) + low


def gripper_to_angular(value):
    """ALOHA's normalized linear gripper position → π's normalized angular position."""
    linear = _from_unit(value, _GRIPPER_OPEN, _GRIPPER_CLOSED)
    # Inverse of the Interbotix angle → linear linkage.
    sine = (_HORN_RADIUS**2 + linear**2 - _ARM_LENGTH**2) / (2 * _HORN_RADIUS * linear)
    angle = np.arcsin(np.clip(sine, -1.0, 1.0))
    return _to_unit(angle, _PI_GRIPPER_MIN, _PI_GRIPPER_MAX)


def gripper_from_angular(value):
    """π's gripper output → ALOHA's normalized gripper joint command (no rescaling of units)."""
    return _to_unit(value + _PI_GRIPPER_MIN, _JOINT_OPEN, _JOINT_CLOSED)


def gripper_from_angular_inv(value):
    """Inverse of `gripper_from_angular` (ALOHA gripper actions → π's space, for training)."""
    return _from_unit(value, _JOINT_OPEN, _JOINT_CLOSED) - _PI_GRIPPER_MIN


def _check_width(x, name):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] != STATE_DIM:
        raise ValueError(f"ALOHA {name!r} must have shape (..., 14), got shape {x.shape}.")
    return x


def _convert(x, gripper_fn):
    out = JOINT_FLIP_MASK * x
    out[..., GRIPPER_DIMS] = gripper_fn(out[..., GRIPPER_DIMS])
    return out


@dataclasses.dataclass(frozen=True)
class AlohaInputs:
    """ALOHA sample → model sample (openpi's `AlohaInputs`).

    Expects `images` `{camera: (3, h, w) or (h, w, 3), uint8 or float [0, 1]}`
    with cameras among `EXPECTED_CAMERAS` (`cam_high` required), `state` (14,),
    optional `actions` (H, 14) and `prompt`. Missing wrist cameras become
    black images with a False mask.

    Args:
        adapt_to_pi: convert joints and grippers to π's space (see module doc).
    """

    adapt_to_pi: bool = True

    def __call__(self, data):
        for key in ("images", "state"):
            if key not in data:
                raise ValueError(f"AlohaInputs: the sample has no {key!r}; it has {sorted(data)}.")
        unknown = set(data["images"]) - set(EXPECTED_CAMERAS)
        if unknown:
            raise ValueError(
                f"AlohaInputs: cameras must be among {EXPECTED_CAMERAS}, "
                f"got {sorted(data['images'])}."
            )
        if "cam_high" not in data["images"]:
            raise ValueError(
                f"AlohaInputs: 'cam_high' is required, got cameras {sorted(data['images'])}."
            )
        images = {
            name: to_uint8_hwc(image, name=f"images/{name}")
            for name, image in data["images"].items()
        }
        base = images["cam_high"]
        state = _check_width(data["state"], "state")
        if self.adapt_to_pi:
            state = _convert(state, gripper_to_angular)
        out = {
            "image": {
                target: images.get(source, np.zeros_like(base))
                for target, source in CAMERA_MAP.items()
            },
            "image_mask": {
                target: np.bool_(source in images) for target, source in CAMERA_MAP.items()
            },
            "state": state,
        }
        if "actions" in data:
            actions = _check_width(data["actions"], "actions")
            if self.adapt_to_pi:
                actions = _convert(actions, gripper_from_angular_inv)
            out["actions"] = actions
        if "prompt" in data:
            out["prompt"] = data["prompt"]
        return out


@dataclasses.dataclass(frozen=True)
class AlohaOutputs:
    """Model actions (..., action_dim) → ALOHA's 14-dim commands (openpi's `AlohaOutputs`)."""

    adapt_to_pi: bool = True

    def __call__(self, data):
        actions = np.asarray(data["actions"], dtype=np.float64)[..., :STATE_DIM]
        if actions.shape[-1] != STATE_DIM:
            raise ValueError(
                f"AlohaOutputs: 'actions' must have at least 14 dims, got shape {actions.shape}."
            )
        if self.adapt_to_pi:
            actions = _convert(actions, gripper_from_angular)
        return {"actions": actions}


def make_aloha_example(seed=0):
    """A random ALOHA observation (CHW uint8 cameras), like openpi's `make_aloha_example`."""
    rng = np.random.default_rng(seed)
    return {
        "state": np.ones((STATE_DIM,), dtype=np.float32),
        "images": {
            name: rng.integers(0, 256, size=(3, 224, 224), dtype=np.uint8)
            for name in EXPECTED_CAMERAS
        },
        "prompt": "do something",
    }
