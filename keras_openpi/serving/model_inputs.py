"""The last input transform of a policy: one checked sample in the model's exact layout.

Whatever the robot transforms produced, the model gets fixed shapes and dtypes
(so its compiled sampler is reused for every request) and a request that
cannot be served gets a `ValueError` that names the key, what was expected and
what came. Values are checked after their conversion to float and their cast
to the model's dtype, so that a finite request whose normalized state
overflows (a float64 1e300, or a float32 3e38 the model would square) is
refused rather than answered with NaN actions.
"""

import dataclasses
import math
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from keras_openpi.serving.request_checks import describe as _describe


def value_limit(dtype):
    """The largest magnitude a model input may have in `dtype`: the square root of its max.

    The model squares its activations (its norms compute mean squares), so an
    input whose square is not finite in the model's dtype cannot be served:
    1.8e19 for float32 and bfloat16, 255.9 for float16.
    """
    return math.sqrt(float(ml_dtypes.finfo(dtype).max))


def _check_magnitude(values, key, dtype, limit):
    """Raises a ValueError naming `key` if a value of `values` is NaN, inf or beyond ±`limit`."""
    bad = ~(np.abs(values) <= limit)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{key!r} has the value {values[index]:.6g} at index {index} after the robot's "
            f"transforms and normalization; the model's {dtype} needs finite values within "
            f"±{limit:.3g}. Check the units of {key!r} and the norm stats."
        )


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """Checks a model-layout sample and brings it to the model's fixed shapes.

    In: `image {camera: (h, w, 3) uint8, or float in [-1, 1]}` for every model
    camera at the model's resolution, optional `image_mask {camera: bool}`,
    `state (s,)` with s <= `action_dim`, `tokenized_prompt (l,)` ints with
    l <= `max_token_len` and optional `tokenized_prompt_mask (l,)`. Out: images
    float32 in [-1, 1], masks bool (True where missing), `state (action_dim,)`
    float32 and prompt `(max_token_len,)` int32 / bool, zero-padded.

    π0-FAST reads its state from the prompt (`TokenizeFASTInputs` wrote it
    there), not as an input: its `state (s,)` may be of any width and is
    kept as it is (`pad_state=False`), for the output transforms.

    Args:
        image_keys: the model's cameras.
        image_resolution: `(height, width)` of the model's cameras.
        action_dim: the model's state width.
        max_token_len: the model's prompt length L.
        vocabulary_size: token ids must be below it.
        compute_dtype: the model's compute dtype; states and float images must
            stay within `value_limit(compute_dtype)` (and float32's) once cast.
        pad_state: the state is a model input, zero-padded to `action_dim`.

    Example:
    >>> check = ModelInputs(("base_0_rgb",), (4, 4), 3, 5, 10)
    >>> out = check({"image": {"base_0_rgb": np.zeros((4, 4, 3), np.uint8)},
    ...              "state": np.ones(2), "tokenized_prompt": np.array([1, 2])})
    >>> out["state"].tolist(), out["tokenized_prompt_mask"].tolist()
    ([1.0, 1.0, 0.0], [True, True, False, False, False])
    """

    image_keys: tuple
    image_resolution: tuple
    action_dim: int
    max_token_len: int
    vocabulary_size: int
    compute_dtype: str = "float32"
    pad_state: bool = True

    @classmethod
    def for_model(cls, model):
        """The checks for a policy model (`PaliGemmaPolicy`: π0, π0.5 or π0-FAST)."""
        return cls(
            tuple(model.image_keys),
            tuple(model.image_resolution),
            int(model.action_dim),
            int(model.max_token_len),
            int(model.vocabulary_size),
            str(model.compute_dtype),
            pad_state=model.model_type != "pi0_fast",
        )

    @property
    def limit(self):
        """The largest magnitude of a state or image value (see `value_limit`)."""
        return min(value_limit(self.compute_dtype), value_limit("float32"))

    def __call__(self, sample):
        return {
            **self._images(sample),
            "state": self._state(sample),
            **self._prompt(sample),
        }

    def _require(self, sample, key, expected):
        if key not in sample:
            raise ValueError(
                f"the observation has no {key!r} (expected {expected}); it has {sorted(sample)}."
            )
        return sample[key]

    def _images(self, sample):
        height, width = self.image_resolution
        expected_shape = f"({height}, {width}, 3) uint8"
        images = self._require(sample, "image", f"{{camera: {expected_shape}}}")
        masks = sample.get("image_mask", {})
        if not isinstance(images, Mapping) or not isinstance(masks, Mapping):
            raise ValueError(
                f"'image' and 'image_mask' must be maps keyed by camera, got "
                f"{_describe(images)} and {_describe(masks)}."
            )
        out_images, out_masks = {}, {}
        for key in self.image_keys:
            if key not in images:
                raise ValueError(
                    f"'image' has no camera {key!r} (expected {expected_shape}); it has "
                    f"{sorted(images)}."
                )
            image = images[key]
            kind = getattr(getattr(image, "dtype", None), "kind", None)
            if (
                not isinstance(image, np.ndarray)
                or image.shape != (height, width, 3)
                or not (image.dtype == np.uint8 or kind == "f")
            ):
                raise ValueError(
                    f"'image/{key}' must be a {expected_shape} (or float32 in [-1, 1]) array, "
                    f"got {_describe(image)}."
                )
            if image.dtype == np.uint8:  # always within [-1, 1]
                image = image.astype(np.float32) / 255.0 * 2.0 - 1.0
            else:
                _check_magnitude(image, f"image/{key}", self.compute_dtype, self.limit)
            out_images[key] = image.astype(np.float32, copy=False)
            mask = np.asarray(masks.get(key, True))
            if mask.size != 1 or mask.dtype.kind not in "biu":
                raise ValueError(f"'image_mask/{key}' must be one bool, got {_describe(mask)}.")
            out_masks[key] = np.bool_(mask.reshape(()))
        return {"image": out_images, "image_mask": out_masks}

    def _state(self, sample):
        width = self.action_dim if self.pad_state else None
        expected = "(s,) float" + (f" with s <= {width}" if width else "")
        state = self._require(sample, "state", expected)
        if (
            not isinstance(state, np.ndarray)
            or state.ndim != 1
            or (width is not None and state.shape[0] > width)
            or state.dtype.kind not in "fiu"
        ):
            raise ValueError(f"'state' must be a {expected} array, got {_describe(state)}.")
        _check_magnitude(state, "state", self.compute_dtype, self.limit)
        out = np.zeros((width or state.shape[0],), np.float32)
        out[: state.shape[0]] = state
        return out

    def _prompt(self, sample):
        length = self.max_token_len
        expected = f"(l,) int with l <= {length} and ids < {self.vocabulary_size}"
        tokens = self._require(sample, "tokenized_prompt", expected)
        if (
            not isinstance(tokens, np.ndarray)
            or tokens.ndim != 1
            or tokens.shape[0] > length
            or tokens.dtype.kind not in "iu"
        ):
            raise ValueError(
                f"'tokenized_prompt' must be a {expected} array, got {_describe(tokens)}."
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocabulary_size):
            raise ValueError(
                f"'tokenized_prompt' ids must be in [0, {self.vocabulary_size}), got ids from "
                f"{tokens.min()} to {tokens.max()}."
            )
        mask = np.asarray(sample.get("tokenized_prompt_mask", np.ones(tokens.shape, bool)))
        if mask.shape != tokens.shape or mask.dtype.kind not in "biu":
            raise ValueError(
                f"'tokenized_prompt_mask' must be a bool array of the shape of "
                f"'tokenized_prompt' {tokens.shape}, got {_describe(mask)}."
            )
        out_tokens = np.zeros((length,), np.int32)
        out_mask = np.zeros((length,), bool)
        out_tokens[: tokens.shape[0]] = tokens
        out_mask[: tokens.shape[0]] = mask
        return {"tokenized_prompt": out_tokens, "tokenized_prompt_mask": out_mask}
