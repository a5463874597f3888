"""openpi-client's `resize_with_pad` in numpy: Pillow's bilinear resample, reproduced.

openpi's `ResizeImages` transform calls `openpi_client.image_tools.resize_with_pad`,
which resizes each uint8 image with `PIL.Image.resize(..., BILINEAR)` to fit the
target while keeping its aspect ratio, then pastes it on a black canvas. This
module computes the same result without Pillow, following Pillow's
`libImaging/Resample.c`:

- separable: a horizontal and a vertical pass (in Pillow's order), each
  rounding to uint8;
- a triangle filter whose support widens by the scale factor when shrinking
  (so downscaling averages, like an antialiased resize), taps normalized to
  sum 1 and quantized to 22-bit fixed point;
- each output value is `(sum(pixel * tap) + 2**21) >> 22`, clipped to [0, 255].

On uint8 images the result equals Pillow's bit for bit (checked against
Pillow 13 on random images and sizes while writing this; the tests pin
hand-derived values).
"""

import functools
import math

import numpy as np

_PRECISION_BITS = 22  # Pillow's 32 - 8 - 2


@functools.lru_cache(maxsize=64)
def _taps(in_size, out_size):
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter.

    Returns:
        `(index, weights)`: (out, K) source indices and int32 fixed-point taps
        (zero past each output's window).
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale  # bilinear support 1.0, widened when shrinking
    size = int(math.ceil(support)) * 2 + 1
    first = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, size), dtype=np.int32)
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = 1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * (1.0 / filter_scale))
        taps = np.maximum(taps, 0.0)
        total = np.cumsum(taps)[-1] if hi > lo else 0.0  # summed left to right, as in C
        if total != 0.0:
            taps = taps / total
        fixed = np.where(taps < 0, -0.5, 0.5) + taps * (1 << _PRECISION_BITS)
        weights[out, : hi - lo] = np.trunc(fixed).astype(np.int32)
        first[out] = lo
    index = np.minimum(first[:, None] + np.arange(size), in_size - 1)
    index.flags.writeable = weights.flags.writeable = False  # cached and shared
    return index, weights


def _resample_rows(image, out_size):
    """One Pillow pass along axis 0 of a uint8 array (int32 sums, as Pillow's C)."""
    index, weights = _taps(image.shape[0], out_size)
    rows = image.reshape(image.shape[0], -1)
    acc = np.full((out_size, rows.shape[1]), 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    for k in range(weights.shape[1]):
        acc += rows[index[:, k]] * weights[:, k, None]
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return out.reshape((out_size,) + image.shape[1:])


def _resample_axis(image, out_size, axis):
    """One Pillow pass along `axis` (0: height, 1: width) of an (h, w, C) uint8 image."""
    if axis == 0:
        return _resample_rows(image, out_size)
    columns = np.ascontiguousarray(image.transpose(1, 0, 2))
    return np.ascontiguousarray(_resample_rows(columns, out_size).transpose(1, 0, 2))


def resize_bilinear(image, height, width):
    """Pillow's `Image.resize((width, height), BILINEAR)` of one (h, w, C) uint8 image.

    Pillow runs the vertical pass first when the height shrinks by more than
    twice as many pixels as the width (Pillow 13; older releases always ran
    the horizontal pass first, which changes a few pixels by 1 in that case).
    """
    shrink_height, shrink_width = image.shape[0] - height, image.shape[1] - width
    axes = [(width, 1), (height, 0)]
    if shrink_height > 0 and shrink_height > 2 * shrink_width:
        axes.reverse()
    out = image
    for size, axis in axes:
        if size != out.shape[axis]:
            out = _resample_axis(out, size, axis=axis)
    return out


def resize_with_pad(images, height, width, name="images"):
    """Resizes uint8 images to fit `(height, width)`, keeping aspect; pads with 0.

    openpi-client's `resize_with_pad`: the image is scaled by
    `1 / max(w / width, h / height)` (sizes truncated to int) with Pillow's
    bilinear filter and pasted at offset `((height - h') // 2, (width - w') // 2)`
    on a zero canvas. Images already of the target size are returned as they are.

    Args:
        images: (..., h, w, C) uint8.
        height: target height.
        width: target width.
        name: how errors refer to `images`.

    Returns:
        (..., height, width, C) uint8.

    Example:
    >>> resize_with_pad(np.full((2, 4, 3), 200, np.uint8), 4, 4)[:, :, 0]
    array([[  0,   0,   0,   0],
           [200, 200, 200, 200],
           [200, 200, 200, 200],
           [  0,   0,   0,   0]], dtype=uint8)
    """
    images = np.asarray(images)
    if images.ndim < 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{name!r} must be uint8 images of shape (..., h, w, C), got dtype {images.dtype} "
            f"and shape {images.shape} (robot input transforms convert images to uint8 HWC)."
        )
    cur_height, cur_width = images.shape[-3:-1]
    if (cur_height, cur_width) == (height, width):
        return images
    ratio = max(cur_width / width, cur_height / height)
    new_height, new_width = int(cur_height / ratio), int(cur_width / ratio)
    flat = images.reshape((-1,) + images.shape[-3:])
    out = np.zeros((flat.shape[0], height, width, images.shape[-1]), dtype=np.uint8)
    top = max(0, int((height - new_height) / 2))
    left = max(0, int((width - new_width) / 2))
    for i, image in enumerate(flat):
        out[i, top : top + new_height, left : left + new_width] = resize_bilinear(
            image, new_height, new_width
        )
    return out.reshape(images.shape[:-3] + out.shape[1:])


def to_uint8_hwc(image, name="image"):
    """openpi's robot image parsing: float [0, 1] → uint8 (`255 * x`, truncated), CHW → HWC.

    An image whose first axis has size 3 is taken as CHW (LeRobot stores
    images as float CHW); uint8 HWC images pass unchanged. Float values are
    clipped to [0, 1] first (openpi leaves out-of-range values to wrap).
    """
    image = np.asarray(image)
    if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
        raise ValueError(
            f"{name!r} must be one RGB image, (h, w, 3) or (3, h, w), got shape {image.shape}."
        )
    if np.issubdtype(image.dtype, np.floating):
        image = (255 * np.clip(image, 0.0, 1.0)).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"{name!r} must be uint8 or float in [0, 1], got dtype {image.dtype}.")
    if image.shape[0] == 3:
        image = np.transpose(image, (1, 2, 0))
    return image
