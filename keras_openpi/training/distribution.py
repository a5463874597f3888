"""Data parallelism and FSDP-style weight sharding with `keras.distribution`.

- `fsdp_devices=1`: `DataParallel` over every device; weights replicated,
  each batch split along its first axis.
- `fsdp_devices=n` (all devices): `ModelParallel` on a 1-D mesh `("batch",)`
  whose layout map shards each large weight along the same axis the data is
  split on: ZeRO-3 / FSDP, as openpi's `fsdp_devices` (weights, their Adam
  moments and EMA are sharded; XLA gathers each weight where it is used).
- `1 < fsdp_devices < n`: a 2-D mesh `("batch", "model")` of
  `(n / fsdp_devices, fsdp_devices)`; weights sharded over `model`, data
  split over `batch`.

Which weights are sharded follows openpi's `fsdp_sharding`: arrays of at
least 4 MiB with two or more axes, along their largest axis that the shard
count divides. A single-head (MQA) key or value kernel `(1, D, H)` is
therefore sharded along its width `D`, never its head axis (keras-hub's
Gemma layout map shards the head axis, which fails with one head).

Several hosts: start every process with `jax.distributed.initialize()`
before Keras touches a device; `keras.distribution.list_devices()` then
lists the devices of all hosts (see docs/training.md).
"""

import math
import re
import warnings

import keras

BATCH_AXIS = "batch"
MODEL_AXIS = "model"
MIN_SHARD_BYTES = 4 * 2**20


def _dtype_bytes(dtype):
    from keras_openpi.finetuning.summary import dtype_bytes

    return dtype_bytes(dtype)


def fsdp_axis(shape, dtype, num_shards, min_bytes=MIN_SHARD_BYTES):
    """The axis openpi's `fsdp_sharding` shards an array along, or None to replicate it.

    Args:
        shape: the array's shape.
        dtype: its dtype.
        num_shards: how many devices share it.
        min_bytes: smaller arrays are replicated.

    Example:
    >>> fsdp_axis((1, 4096, 256), "float32", 8)  # a one-head key kernel: its width
    1
    >>> fsdp_axis((2048,), "float32", 8) is None  # vectors are replicated
    True
    """
    shape = tuple(int(d) for d in shape)
    if num_shards <= 1 or len(shape) < 2:
        return None
    if math.prod(shape) * _dtype_bytes(dtype) < min_bytes:
        return None
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_shards == 0:
            return axis
    warnings.warn(
        f"no axis of shape {shape} divides over {num_shards} devices; the weight is replicated.",
        stacklevel=2,
    )
    return None


def fsdp_layout_map(variables, device_mesh, axis_name=MODEL_AXIS, min_bytes=MIN_SHARD_BYTES):
    """A `keras.distribution.LayoutMap` sharding each large variable along its `fsdp_axis`.

    Keys are the variables' exact paths (escaped), so each variable gets
    its own layout; variables not in the map are replicated.

    Args:
        variables: the model's variables (e.g. of a model built under
            `keras_openpi.finetuning.shapes_only()`, which allocates nothing).
        device_mesh: a `keras.distribution.DeviceMesh` with `axis_name`.
        axis_name: the mesh axis weights are sharded over.
        min_bytes: smaller variables are replicated.
    """
    num_shards = device_mesh.shape[list(device_mesh.axis_names).index(axis_name)]
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for variable in variables:
        axis = fsdp_axis(variable.shape, variable.dtype, num_shards, min_bytes)
        if axis is not None:
            axes = [None] * len(variable.shape)
            axes[axis] = axis_name
            layout_map[re.escape(variable.path)] = tuple(axes)
    return layout_map


def check_batch_size(batch_size, num_devices, fsdp_devices=1):
    """Raises a one-line ValueError when the global batch does not split evenly over the devices."""
    if fsdp_devices < 1 or num_devices % fsdp_devices:
        raise ValueError(f"fsdp_devices={fsdp_devices} must divide the {num_devices} devices.")
    splits = num_devices if fsdp_devices in (1, num_devices) else num_devices // fsdp_devices
    if batch_size % splits:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {splits} data-parallel devices "
            f"({num_devices} devices, fsdp_devices={fsdp_devices}); choose a multiple of {splits}."
        )


def training_devices():
    """The devices training spreads over: all of JAX's, or the one device of another backend.

    Keras' distribution API (device meshes and layouts) exists on JAX only; on
    PyTorch and TensorFlow, `fit` trains on one device.

    Example:
    >>> len(training_devices()) >= 1
    True
    """
    if keras.backend.backend() != "jax":
        return [f"{keras.backend.backend()}:0"]
    return keras.distribution.list_devices()


def make_distribution(variables=None, fsdp_devices=1, devices=None, min_bytes=None):
    """The distribution for `fsdp_devices` (see the module docstring), or None on one device.

    Args:
        variables: the model's variables, to lay out (needed when `fsdp_devices > 1`).
        fsdp_devices: devices each large weight is sharded over.
        devices: the devices (default `training_devices()`).
        min_bytes: weights smaller than this stay replicated (default `MIN_SHARD_BYTES`, 4 MiB).

    Example:
    >>> with shapes_only():  # doctest: +SKIP
    ...     variables = Pi0(**config).variables
    >>> distribution = make_distribution(variables, fsdp_devices=8)  # doctest: +SKIP
    >>> with distribution.scope():  # doctest: +SKIP
    ...     model = Pi0(**config)
    """
    devices = list(devices or training_devices())
    if fsdp_devices > 1 and keras.backend.backend() != "jax":
        raise ValueError(
            f"fsdp_devices={fsdp_devices} needs keras.distribution, which the "
            f"{keras.backend.backend()!r} backend does not have: train with KERAS_BACKEND=jax, "
            "or set fsdp_devices=1."
        )
    count = len(devices)
    if fsdp_devices < 1 or count % fsdp_devices:
        raise ValueError(f"fsdp_devices={fsdp_devices} must divide the {count} devices.")
    if fsdp_devices == 1:
        if count == 1:
            return None
        return keras.distribution.DataParallel(devices=devices)
    if variables is None:
        raise ValueError("sharding weights (fsdp_devices > 1) needs the model's variables.")
    min_bytes = MIN_SHARD_BYTES if min_bytes is None else min_bytes
    if fsdp_devices == count:
        mesh = keras.distribution.DeviceMesh((count,), (BATCH_AXIS,), devices)
        layout_map = fsdp_layout_map(variables, mesh, BATCH_AXIS, min_bytes)
    else:
        mesh = keras.distribution.DeviceMesh(
            (count // fsdp_devices, fsdp_devices), (BATCH_AXIS, MODEL_AXIS), devices
        )
        layout_map = fsdp_layout_map(variables, mesh, MODEL_AXIS, min_bytes)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=BATCH_AXIS)
