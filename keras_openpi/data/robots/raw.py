"""`raw`: samples already in the model's layout (no robot-specific mapping)."""

import dataclasses

import numpy as np

from keras_openpi.data.image_tools import to_uint8_hwc


@dataclasses.dataclass(frozen=True)
class RawInputs:
    """Checks a model-layout sample and parses its images to uint8 HWC.

    Expects `image` `{camera: (h, w, 3) or (3, h, w), uint8 or float [0, 1]}`,
    `state` (s,), optional `image_mask`, `actions` and `prompt`; cameras
    without a mask get True.
    """

    def __call__(self, data):
        for key in ("image", "state"):
            if key not in data:
                raise ValueError(f"RawInputs: the sample has no {key!r}; it has {sorted(data)}.")
        if not isinstance(data["image"], dict) or not data["image"]:
            raise ValueError(
                "RawInputs: 'image' must be a dict {camera: image}, "
                f"got {type(data['image']).__name__}."
            )
        masks = data.get("image_mask", {})
        out = dict(data)
        out["image"] = {k: to_uint8_hwc(v, f"image/{k}") for k, v in data["image"].items()}
        out["image_mask"] = {k: np.bool_(masks.get(k, True)) for k in data["image"]}
        out["state"] = np.asarray(data["state"])
        return out


@dataclasses.dataclass(frozen=True)
class RawOutputs:
    """Keeps only `actions` (all of the model's action dims)."""

    def __call__(self, data):
        return {"actions": np.asarray(data["actions"])}
