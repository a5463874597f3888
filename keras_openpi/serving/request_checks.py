"""The first input transform of a policy: a robot's request checked before any transform runs.

A request comes from the network, so it may hold anything msgpack can carry.
`CheckRequest` checks what the robot's transforms will read (its images,
states, masks and prompt, from the robot's `RequestSpec`) and raises a
`ValueError` that names the key, what was expected and what came, instead of
letting a degenerate value reach the transforms (where it would fail with a
`ZeroDivisionError` or `IndexError`, or be silently misread). The values the
model finally sees are checked again after their cast (see `ModelInputs`).
"""

import dataclasses
from collections.abc import Mapping

import numpy as np

# The key of the prompt (text).
PROMPT_KEY = "prompt"
# A request's actions are not an input of inference: they are dropped (openpi's
# policy passes them through its transforms unused).
ACTIONS_KEY = "actions"


def describe(value):
    """A short description of a request value for error messages: `float32 array of shape (2,)`."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    if isinstance(value, np.generic):
        return f"{value.dtype} scalar"
    return type(value).__name__


def check_finite(observation, prefix=""):
    """Raises a ValueError naming the first float leaf of `observation` with NaN or inf.

    Args:
        observation: a nested dict of arrays, scalars and strings (a request).
        prefix: the "/"-path of `observation` inside the request.

    Example:
    >>> check_finite({"state": np.array([0.0, np.nan])})
    Traceback (most recent call last):
    ...
    ValueError: 'state' has a non-finite value (nan) at index (1,); expected finite numbers.
    """
    for key, value in observation.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            check_finite(value, f"{path}/")
        elif isinstance(value, (np.ndarray, np.generic, float)):
            _check_finite_array(np.asarray(value), path)


def _check_finite_array(array, path):
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(
            f"{path!r} has a non-finite value ({array[index]}) at index {index}; "
            "expected finite numbers."
        )


def check_keys(observation, prefix=""):
    """Raises a ValueError naming the first map key of `observation` that is not a str."""
    for key, value in observation.items():
        if not isinstance(key, str):
            raise ValueError(
                f"the observation's keys must be str, got the {type(key).__name__} key "
                f"{key!r:.40} in {prefix.rstrip('/') or 'the observation'!r}."
            )
        if isinstance(value, Mapping):
            check_keys(value, f"{prefix}{key}/")


def check_prompt(prompt):
    """Raises a ValueError unless `prompt` is None, a str, UTF-8 bytes or a 0-d text array."""
    if isinstance(prompt, np.ndarray) and prompt.ndim == 0 and prompt.dtype.kind in "US":
        prompt = prompt.item()
    if prompt is None or isinstance(prompt, str):
        return
    if isinstance(prompt, bytes):
        try:
            prompt.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"'prompt' must be UTF-8 text, got bytes that are not UTF-8 ({error.reason} at "
                f"byte {error.start}); send the prompt as a str."
            ) from None
        return
    raise ValueError(f"'prompt' must be a str, got {describe(prompt)}.")


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """What a robot's requests hold, for `CheckRequest`: top-level keys by kind.

    Args:
        images: keys of single images, `(h, w, 3)` or `(3, h, w)`, uint8 or float.
        image_maps: keys of `{camera: image}` maps.
        image_masks: keys of optional `{camera: bool}` maps, one per entry of
            `image_maps` (the mask of the same index).
        states: `{key: allowed ranks}` of numeric arrays (states, joints, grippers).
    """

    images: tuple = ()
    image_maps: tuple = ()
    image_masks: tuple = ()
    states: Mapping = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckRequest:
    """Checks a robot request against its `RequestSpec`; returns it without `actions`.

    Every map key must be a str; `prompt` must be text (UTF-8 if bytes); each
    state a non-empty, finite numeric array of an allowed rank; each image one
    non-empty, finite RGB image, uint8 or float, `(h, w, 3)` or `(3, h, w)`,
    that still has a pixel on each axis once resized to the model's
    resolution; each image map a non-empty `{camera: image}` dict; each
    mask map a dict of one bool per camera of its image map. Keys that are
    missing are left to the robot's transforms to report (and non-finite
    values elsewhere to `check_finite`, which a `Policy` runs first).

    Args:
        spec: the robot's `RequestSpec`.
        image_resolution: `(height, width)` images are resized to.

    Example:
    >>> check = CheckRequest(RequestSpec(states={"state": (1,)}), (4, 4))
    >>> check({"state": np.float32(1.0)})
    Traceback (most recent call last):
    ...
    ValueError: 'state' must be a numeric array of rank 1, got float32 scalar.
    """

    spec: RequestSpec
    image_resolution: tuple

    def __call__(self, data):
        check_keys(data)
        check_prompt(data.get(PROMPT_KEY))
        for key, ranks in self.spec.states.items():
            if key in data:
                _check_state(data[key], key, ranks)
        for key in self.spec.images:
            if key in data:
                self._check_image(data[key], key)
        for index, key in enumerate(self.spec.image_maps):
            if key in data:
                cameras = self._check_image_map(data[key], key)
                if index < len(self.spec.image_masks):
                    mask_key = self.spec.image_masks[index]
                    _check_masks(data.get(mask_key, {}), mask_key, key, cameras)
        return {k: v for k, v in data.items() if k != ACTIONS_KEY}

    def _check_image_map(self, images, key):
        if not isinstance(images, Mapping) or not images:
            got = "an empty dict" if isinstance(images, Mapping) else describe(images)
            raise ValueError(f"{key!r} must be a dict {{camera: image}}, got {got}.")
        for camera, image in images.items():
            self._check_image(image, f"{key}/{camera}")
        return sorted(images)

    def _check_image(self, image, key):
        expected = "one RGB image, (h, w, 3) or (3, h, w), uint8 or float in [0, 1]"
        array = _as_array(image, key, expected, kinds="buf")
        if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
            raise ValueError(f"{key!r} must be {expected}, got {describe(image)}.")
        if array.dtype != np.uint8 and array.dtype.kind != "f":
            raise ValueError(f"{key!r} must be {expected}, got {describe(image)}.")
        height, width = array.shape[1:] if array.shape[0] == 3 else array.shape[:2]
        if not (height and width):
            raise ValueError(f"{key!r} must be {expected}, got an empty {describe(image)}.")
        _check_finite_array(array, key)
        target_height, target_width = self.image_resolution
        if (height, width) != (target_height, target_width):
            ratio = max(width / target_width, height / target_height)
            if int(height / ratio) < 1 or int(width / ratio) < 1:
                raise ValueError(
                    f"{key!r} of {height}x{width} pixels is too thin to resize to the model's "
                    f"{target_height}x{target_width} (it would be {int(height / ratio)}x"
                    f"{int(width / ratio)} pixels); send an image of a less extreme aspect ratio."
                )


def _as_array(value, key, expected, kinds):
    if isinstance(value, (str, bytes, Mapping)) or value is None:
        raise ValueError(f"{key!r} must be {expected}, got {describe(value)}.")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise ValueError(f"{key!r} must be {expected}, got a ragged {describe(value)}.") from None
    if array.dtype.kind not in kinds:
        raise ValueError(f"{key!r} must be {expected}, got {describe(array)}.")
    return array


def _check_state(state, key, ranks):
    names = " or ".join(str(rank) for rank in ranks)
    expected = f"a numeric array of rank {names}"
    array = _as_array(state, key, expected, kinds="iuf")
    if array.ndim not in ranks:
        raise ValueError(f"{key!r} must be {expected}, got {describe(state)}.")
    if array.size == 0:
        raise ValueError(f"{key!r} must be {expected} with at least one value, got it empty.")
    _check_finite_array(array, key)


def _check_masks(masks, key, images_key, cameras):
    if not isinstance(masks, Mapping):
        raise ValueError(
            f"{key!r} must be a dict {{camera: bool}} over the cameras of {images_key!r}, got "
            f"{describe(masks)}."
        )
    for camera, mask in masks.items():
        if camera not in cameras:
            raise ValueError(
                f"{key!r} has the camera {camera!r}, which is not in {images_key!r} {cameras}."
            )
        array = None if isinstance(mask, (str, bytes, Mapping)) else np.asarray(mask)
        is_flag = array is not None and array.size == 1 and array.dtype.kind in "biu"
        if is_flag and array.dtype.kind != "b":
            is_flag = array.item() in (0, 1)
        if not is_flag:
            raise ValueError(f"'{key}/{camera}' must be one bool, got {describe(mask)}.")
