"""Checking and normalizing openpi's observation dict before the model sees it.

The policies compose these in `PaliGemmaPolicy.prepare_observation`.
"""

from keras import ops

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def resize_with_pad(images, height, width):
    """Resizes (B, h, w, C) float images in [-1, 1], keeping aspect, padding with -1.

    Bilinear (antialiased) resize so that the image fits, then a symmetric pad
    (the extra pixel of an odd pad goes to the bottom/right), as openpi does.
    """
    cur_height, cur_width = images.shape[1], images.shape[2]
    if (cur_height, cur_width) == (height, width):
        return images
    ratio = max(cur_width / width, cur_height / height)
    resized_height, resized_width = int(cur_height / ratio), int(cur_width / ratio)
    resized = ops.image.resize(
        images,
        (resized_height, resized_width),
        interpolation="bilinear",
        antialias=True,
        data_format="channels_last",
    )
    resized = ops.clip(resized, -1.0, 1.0)
    pad_top = (height - resized_height) // 2
    pad_left = (width - resized_width) // 2
    return ops.pad(
        resized,
        (
            (0, 0),
            (pad_top, height - resized_height - pad_top),
            (pad_left, width - resized_width - pad_left),
            (0, 0),
        ),
        constant_values=-1.0,
    )


def _require(observation, key, where="observation"):
    if not isinstance(observation, dict) or key not in observation:
        have = sorted(observation) if isinstance(observation, dict) else type(observation)
        raise ValueError(f"{where} is missing the key {key!r}; it has {have}.")
    return observation[key]


def _check_rank(value, rank, key, expected):
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) != rank:
        raise ValueError(f"{key!r} must have shape {expected}, got shape {shape}.")
    return shape


def prepare_images(observation, image_keys, image_resolution):
    """The cameras of an observation, checked and brought to the model's resolution.

    Args:
        observation: a dict with `image` `{camera: (B, h, w, 3)}` (float in
            [-1, 1], or uint8 mapped to `x / 255 * 2 - 1`) and optionally
            `image_mask` `{camera: (B,)}` (missing masks are true). Other
            resolutions are resized with padding; cameras not in `image_keys`
            are ignored.
        image_keys: the cameras the model was built for, in order.
        image_resolution: `(height, width)` the model expects.

    Returns:
        `(images, masks)`: lists of (B, H, W, 3) float32 and (B,) bool, in
        `image_keys` order.

    Raises:
        ValueError: naming the key, for a missing camera or a wrong shape.
    """
    images_in = _require(observation, "image")
    masks_in = observation.get("image_mask") or {}
    height, width = image_resolution
    images, masks = [], []
    for key in image_keys:
        image = _require(images_in, key, where="observation['image']")
        shape = _check_rank(image, 4, f"image/{key}", "(B, H, W, 3)")
        if shape[-1] != 3:
            raise ValueError(
                f"'image/{key}' must have shape (B, H, W, 3), got shape {shape}."
            )
        if str(image.dtype) == "uint8":
            image = ops.cast(image, "float32") / 255.0 * 2.0 - 1.0
        image = resize_with_pad(ops.cast(image, "float32"), height, width)
        images.append(image)
        mask = masks_in.get(key)
        if mask is None:
            mask = ops.ones((shape[0],), dtype="bool")
        else:
            _check_rank(mask, 1, f"image_mask/{key}", "(B,)")
        masks.append(ops.cast(mask, "bool"))
    return images, masks


def prepare_state(observation, action_dim):
    """The (B, s) `state` of an observation, zero-padded to (B, action_dim) float32.

    Raises:
        ValueError: a missing state, a wrong rank, or s > action_dim.
    """
    state = _require(observation, "state")
    state_shape = _check_rank(state, 2, "state", f"(B, s) with s <= {action_dim}")
    if state_shape[-1] > action_dim:
        raise ValueError(
            f"'state' must have shape (B, s) with s <= action_dim = {action_dim}, "
            f"got shape {state_shape}."
        )
    return pad_last_axis(ops.cast(state, "float32"), action_dim)


def prepare_prompt(observation, max_token_len):
    """`(tokens (B, L) int32, token_mask (B, L) bool)` from `tokenized_prompt` and its mask.

    Both are padded to `max_token_len`; a missing mask is true.

    Raises:
        ValueError: a missing prompt, a wrong shape, or a prompt longer than
            `max_token_len`.
    """
    tokens = _require(observation, "tokenized_prompt")
    token_shape = _check_rank(
        tokens, 2, "tokenized_prompt", f"(B, L) with L <= {max_token_len}"
    )
    if token_shape[-1] > max_token_len:
        raise ValueError(
            f"'tokenized_prompt' must have shape (B, L) with L <= max_token_len = "
            f"{max_token_len}, got shape {token_shape}."
        )
    token_mask = observation.get("tokenized_prompt_mask")
    if token_mask is None:
        token_mask = ops.ones(token_shape, dtype="bool")
    elif tuple(token_mask.shape) != token_shape:
        raise ValueError(
            f"'tokenized_prompt_mask' must have the shape of 'tokenized_prompt' "
            f"{token_shape}, got shape {tuple(token_mask.shape)}."
        )
    tokens = pad_last_axis(ops.cast(tokens, "int32"), max_token_len)
    token_mask = pad_last_axis(ops.cast(token_mask, "bool"), max_token_len)
    return tokens, token_mask


def pad_last_axis(x, size):
    """Zero-pads (False-pads) the last axis of `x` up to `size`."""
    missing = size - x.shape[-1]
    if missing <= 0:
        return x
    return ops.pad(x, [(0, 0)] * (len(x.shape) - 1) + [(0, missing)])
