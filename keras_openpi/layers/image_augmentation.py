"""Training-time image augmentation as openpi applies it, in `keras.ops`.

openpi (`preprocess_observation(train=True)`, via augmax 0.4.1) augments each
example of a batch, after resizing, on images mapped to [0, 1]:

- cameras without "wrist" in their name: a random crop of 95% of the height
  and width, resized back, and a rotation by an angle uniform in ±5° — one
  bilinear resampling of the composed transform, zeros (black) outside;
- every camera: a color jitter, applied with probability 0.5, in HSV space:
  brightness `b ~ U(-0.3, 0.3)` and contrast `c ~ U(-0.4, 0.4)` on the value,
  hue shifted by `h ~ U(-0.1, 0.1)` (augmax's default, which openpi keeps).
  openpi also asks for saturation 0.5, but augmax 0.4.1 computes the
  saturation change and drops it, so openpi's models were trained with no
  saturation jitter; `saturation=0.0` reproduces that, a positive value
  applies it for real (to the HSV saturation, like the brightness change).

Random parameters are drawn per example. As in openpi, all non-wrist cameras
of an example share one draw and all wrist cameras another (openpi hands every
camera the same per-example key). Everything is `keras.ops`, so it runs inside
a compiled train step; results are deterministic given the seed.

`ImageAugmentation` is the layer the policies hold (with its own seed
generator, advanced once per training call); `augment_images` the function
it applies, for a given seed.
"""

import math

import keras
from keras import ops

# Columns of the per-example random draw.
_CROP_Y, _CROP_X, _ANGLE, _APPLY, _BRIGHTNESS, _CONTRAST, _HUE, _SATURATION = range(8)


def _bilinear_sample(images, y, x):
    """Samples (B, H, W, C) at float pixel coordinates y, x (B, H', W'); zeros outside.

    Like `jax.scipy.ndimage.map_coordinates(order=1, mode="constant", cval=0)`:
    each of the 4 neighbours outside the image contributes 0.
    """
    _, height, width, channels = images.shape
    batch = ops.shape(images)[0]
    flat = ops.reshape(images, (batch, height * width, channels))
    y0 = ops.floor(y)
    x0 = ops.floor(x)
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            yy = y0 + dy
            xx = x0 + dx
            weight = (1.0 - ops.abs(y - yy)) * (1.0 - ops.abs(x - xx))
            valid = (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
            index = ops.cast(
                ops.clip(yy, 0, height - 1) * width + ops.clip(xx, 0, width - 1), "int32"
            )
            index = ops.reshape(index, (batch, -1, 1))
            points = index.shape[1]
            values = ops.take_along_axis(
                flat, ops.broadcast_to(index, (batch, points, channels)), axis=1
            )
            values = ops.reshape(values, (batch,) + tuple(y.shape[1:]) + (channels,))
            out = out + ops.where(valid[..., None], weight[..., None] * values, 0.0)
    return out


def crop_resize_rotate(images, offset_y, offset_x, angle, crop_scale=0.95):
    """openpi's `RandomCrop → Resize → Rotate` chain with given parameters.

    Output pixel p (centred coordinates) samples the input at
    `S · R(angle) · p + offset` (centred), `S = diag(h_crop / H, w_crop / W)`,
    `h_crop = int(H * crop_scale)`; `R = [[cos, sin], [-sin, cos]]` on (y, x).

    Args:
        images: (B, H, W, C) float in [0, 1].
        offset_y: (B,) crop centre offset in pixels, within ±(H - h_crop) / 2.
        offset_x: (B,) likewise for the width.
        angle: (B,) rotation in radians.
        crop_scale: crop side as a fraction of the image side.

    Returns:
        (B, H, W, C).
    """
    _, height, width, _ = images.shape
    scale_y = int(height * crop_scale) / height
    scale_x = int(width * crop_scale) / width
    grid_y = ops.arange(height, dtype="float32") - (height / 2 - 0.5)
    grid_x = ops.arange(width, dtype="float32") - (width / 2 - 0.5)
    py = grid_y[None, :, None]
    px = grid_x[None, None, :]
    cos = ops.cos(angle)[:, None, None]
    sin = ops.sin(angle)[:, None, None]
    y = scale_y * (cos * py + sin * px) + offset_y[:, None, None] + (height / 2 - 0.5)
    x = scale_x * (-sin * py + cos * px) + offset_x[:, None, None] + (width / 2 - 0.5)
    return _bilinear_sample(images, y, x)


def rgb_to_hsv(images):
    """(..., 3) RGB in [0, 1] → hue (in turns, may be negative), saturation, value (augmax)."""
    red, green, blue = images[..., 0], images[..., 1], images[..., 2]
    value = ops.max(images, axis=-1)
    spread = value - ops.min(images, axis=-1)
    safe = ops.where(spread == 0, 1.0, spread)
    channel = ops.argmax(images, axis=-1)
    hue = ops.where(
        channel == 0,
        (green - blue) / safe,
        ops.where(channel == 1, 2.0 + (blue - red) / safe, 4.0 + (red - green) / safe),
    )
    hue = ops.where(spread == 0, 0.0, hue / 6.0)
    saturation = ops.where(value == 0, 0.0, spread / ops.where(value == 0, 1.0, value))
    return hue, saturation, value


def hsv_to_rgb(hue, saturation, value):
    """Inverse of `rgb_to_hsv`: (...,) each → (..., 3)."""
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = ops.mod(n + hue * 6.0, 6.0)
        ramp = ops.maximum(0.0, ops.minimum(ops.minimum(k, 4.0 - k), 1.0))
        channels.append(value - value * saturation * ramp)
    return ops.stack(channels, axis=-1)


def adjust_brightness(value, amount):
    """augmax's brightness: scales towards 0 (amount < 0) or towards 1 (amount > 0)."""
    return ops.where(amount < 0.0, value * (1.0 + amount), value * (1.0 - amount) + amount)


def adjust_contrast(value, amount):
    """augmax's invertible contrast curve: slope `tan((amount + 1) π / 4)` through (0.5, 0.5).

    Linear with slope `s` around 0.5, joined to (0, 0) and (1, 1) by lines of
    slope `1 / s` at `p1 = s / (2 (1 + s))` and `1 - p1` (augmax writes
    `p1 = (s - s²) / (2 (1 - s²))`, the same away from s = 1).
    """
    slope = ops.tan((amount + 1.0) * (math.pi / 4.0))
    p1 = slope / (2.0 * (1.0 + slope))
    middle = slope * (value - 0.5) + 0.5
    low = value / slope
    high = value / slope + 1.0 - 1.0 / slope
    return ops.where(value < p1, low, ops.where(value > 1.0 - p1, high, middle))


def color_jitter(
    images, params, brightness=0.3, contrast=0.4, saturation=0.0, hue=0.1, probability=0.5
):
    """augmax's `ColorJitter` with per-example uniform draws `params` (B, 8) in [0, 1).

    Args:
        images: (B, H, W, 3) float in [0, 1].
        params: (B, 8) uniforms; columns `_APPLY`, `_BRIGHTNESS`, `_CONTRAST`,
            `_HUE`, `_SATURATION` are used.
        brightness, contrast, saturation, hue: maximum absolute change of each.
        probability: chance that an example is jittered at all.

    Returns:
        (B, H, W, 3).
    """

    def amount(column, strength):
        return ((params[:, column] * 2.0 - 1.0) * strength)[:, None, None]

    h, s, v = rgb_to_hsv(images)
    if brightness > 0:
        v = adjust_brightness(v, amount(_BRIGHTNESS, brightness))
    if contrast > 0:
        v = adjust_contrast(v, amount(_CONTRAST, contrast))
    if hue > 0:
        h = h + amount(_HUE, hue)
    if saturation > 0:
        s = adjust_brightness(s, amount(_SATURATION, saturation))
    jittered = hsv_to_rgb(h, s, v)
    apply = (params[:, _APPLY] < probability)[:, None, None, None]
    return ops.where(apply, jittered, images)


def augment_images(
    images,
    seed,
    *,
    crop_scale=0.95,
    max_rotation_degrees=5.0,
    brightness=0.3,
    contrast=0.4,
    saturation=0.0,
    hue=0.1,
    jitter_probability=0.5,
):
    """Augments a batch of every camera as openpi's training does (see the module doc).

    Args:
        images: `{camera: (B, H, W, 3) float32 in [-1, 1]}`; cameras with
            "wrist" in their name get only the color jitter.
        seed: a `keras.random.SeedGenerator` (e.g. the model's, advanced once
            per call), an int, or on JAX a (2,) uint32 seed tensor.
        crop_scale: crop side fraction for non-wrist cameras (1 disables cropping).
        max_rotation_degrees: rotation range ± for non-wrist cameras.
        brightness, contrast, saturation, hue, jitter_probability: the color
            jitter (`color_jitter`).

    Returns:
        `{camera: (B, H, W, 3) float32 in [-1, 1]}`, same keys.

    Example:
    >>> images = {"base_0_rgb": keras.ops.zeros((2, 224, 224, 3))}
    >>> out = augment_images(images, keras.random.SeedGenerator(0))
    >>> tuple(out["base_0_rgb"].shape)
    (2, 224, 224, 3)
    """
    if not images:
        return images
    batch = next(iter(images.values())).shape[0]
    # Row 0: the draw of every non-wrist camera; row 1: of every wrist camera.
    draws = keras.random.uniform((2, batch, 8), seed=seed, dtype="float32")
    max_angle = math.radians(max_rotation_degrees)
    out = {}
    for key, image in images.items():
        if len(image.shape) != 4 or image.shape[-1] != 3:
            raise ValueError(
                f"image {key!r} must have shape (B, H, W, 3), got {tuple(image.shape)}."
            )
        wrist = "wrist" in key
        params = draws[1 if wrist else 0]
        x = ops.cast(image, "float32") / 2.0 + 0.5
        if not wrist:
            height, width = image.shape[1], image.shape[2]
            limit_y = (height - int(height * crop_scale)) / 2.0
            limit_x = (width - int(width * crop_scale)) / 2.0
            x = crop_resize_rotate(
                x,
                offset_y=(params[:, _CROP_Y] * 2.0 - 1.0) * limit_y,
                offset_x=(params[:, _CROP_X] * 2.0 - 1.0) * limit_x,
                angle=(params[:, _ANGLE] * 2.0 - 1.0) * max_angle,
                crop_scale=crop_scale,
            )
        x = color_jitter(x, params, brightness, contrast, saturation, hue, jitter_probability)
        out[key] = x * 2.0 - 1.0
    return out


@keras.saving.register_keras_serializable(package="keras_openpi")
class ImageAugmentation(keras.layers.Layer):
    """openpi's training-time augmentation of every camera, with its own seed generator.

    In training (`training=True`) it applies `augment_images` with a seed
    drawn from its generator (which advances once per call, also inside a
    compiled train step, and is saved with the model); otherwise it returns
    the images unchanged.

    Args:
        seed: the generator's seed (None: a random one).
        crop_scale, max_rotation_degrees, brightness, contrast, saturation,
            hue, jitter_probability: see `augment_images`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        images: `{camera: (B, H, W, 3) float32 in [-1, 1]}`.
        training: augment only when true.

    Example:
    >>> augmentation = ImageAugmentation(seed=0)
    >>> images = {"base_0_rgb": keras.ops.zeros((2, 32, 32, 3))}
    >>> tuple(augmentation(images, training=True)["base_0_rgb"].shape)
    (2, 32, 32, 3)
    """

    def __init__(
        self,
        seed=None,
        crop_scale=0.95,
        max_rotation_degrees=5.0,
        brightness=0.3,
        contrast=0.4,
        saturation=0.0,
        hue=0.1,
        jitter_probability=0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.seed = seed
        self.options = dict(
            crop_scale=crop_scale,
            max_rotation_degrees=max_rotation_degrees,
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            hue=hue,
            jitter_probability=jitter_probability,
        )
        # Named after the layer: variable paths (checkpoint keys) must not repeat the model's own.
        self.seed_generator = keras.random.SeedGenerator(seed, name=f"{self.name}_seed_generator")
        self.built = True

    def call(self, images, training=False):
        if not training:
            return images
        return augment_images(images, self.seed_generator, **self.options)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed, **self.options}
