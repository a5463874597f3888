"""MetaWorld (simulated Sawyer, one camera, 4-dim state and actions): examples/metaworld's mapping.

State: the hand's position (x, y, z in m) and the gripper's opening in [0, 1], the first 4
of MetaWorld's 39 observation numbers. Actions: the hand's displacement (x, y, z; 1 is 1 cm
a step) and the gripper's effort (+1 closes), each in [-1, 1], MetaWorld's action space. The
camera is the model's `base_0_rgb`; the wrist cameras are black with a False mask (π0-FAST:
True, as openpi's LIBERO mapping).
"""

import dataclasses

import numpy as np

from keras_openpi.data.image_tools import to_uint8_hwc
from keras_openpi.data.robots.droid import check_model_type

STATE_DIM = 4
ACTION_DIM = 4
# examples/metaworld's LeRobot datasets (the layout of LeRobot's MetaWorld data).
LEROBOT_REPACK = {
    "observation/image": "observation.image",
    "observation/state": "observation.state",
    "actions": "action",
    "prompt": "prompt",
}


def _check(x, name, dims):
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] != dims:
        raise ValueError(f"MetaWorld {name!r} must have shape (..., {dims}), got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"MetaWorld {name!r} has non-finite values: {x}.")
    return x


@dataclasses.dataclass(frozen=True)
class MetaworldInputs:
    """MetaWorld observation → model sample.

    Expects `observation/image` (HWC uint8, or LeRobot's float CHW), `observation/state`
    (4,), optional `actions` (H, 4) and `prompt`.

    Args:
        model_type: `pi0`, `pi05` or `pi0_fast`.
    """

    model_type: str = "pi0"

    def __post_init__(self):
        check_model_type(self.model_type)

    def __call__(self, data):
        for key in ("observation/image", "observation/state"):
            if key not in data:
                raise ValueError(
                    f"MetaworldInputs: the sample has no {key!r}; it has {sorted(data)}."
                )
        base = to_uint8_hwc(data["observation/image"], "observation/image")
        out = {
            "state": _check(data["observation/state"], "observation/state", STATE_DIM),
            "image": {
                "base_0_rgb": base,
                "left_wrist_0_rgb": np.zeros_like(base),
                "right_wrist_0_rgb": np.zeros_like(base),
            },
            "image_mask": {
                "base_0_rgb": np.True_,
                "left_wrist_0_rgb": np.bool_(self.model_type == "pi0_fast"),
                "right_wrist_0_rgb": np.bool_(self.model_type == "pi0_fast"),
            },
        }
        if "actions" in data:
            out["actions"] = _check(data["actions"], "actions", ACTION_DIM)
        if "prompt" in data:
            out["prompt"] = data["prompt"]
        return out


@dataclasses.dataclass(frozen=True)
class MetaworldOutputs:
    """Model actions (..., action_dim) → MetaWorld's 4 numbers, clipped to its action space [-1, 1]."""

    def __call__(self, data):
        actions = np.asarray(data["actions"])
        if actions.ndim < 1 or actions.shape[-1] < ACTION_DIM:
            raise ValueError(
                f"MetaworldOutputs: 'actions' must have at least {ACTION_DIM} dims, got shape "
                f"{actions.shape}."
            )
        return {"actions": np.clip(actions[..., :ACTION_DIM], -1.0, 1.0)}


def make_metaworld_example(seed=0):
    """A random MetaWorld observation (64x64 camera)."""
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "observation/state": rng.uniform(0, 1, STATE_DIM).astype(np.float32),
        "prompt": "open the drawer",
    }
