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

Several processes (JAX's multi-controller runtime, one per host or GPU):
each joins with `keras.distribution.initialize` before Keras touches a
device (`keras-openpi train --coordinator ... --num-processes ...
--process-id ...`); `keras.distribution.list_devices()` then lists every
process's devices and the mesh spans them. Each process loads only the rows
of every global batch that its devices hold (`data_shard`), and Keras' JAX
trainer assembles them into the global batch
(`jax.make_array_from_process_local_data`), so the batch is the one a
single process would load, in the same order (see docs/training.md).
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


def device_mesh(fsdp_devices=1, devices=None):
    """The `DeviceMesh` of `make_distribution`: axes `("batch",)` or `("batch", "model")`."""
    devices = list(devices or training_devices())
    count = len(devices)
    if fsdp_devices < 1 or count % fsdp_devices:
        raise ValueError(f"fsdp_devices={fsdp_devices} must divide the {count} devices.")
    if fsdp_devices in (1, count):
        return keras.distribution.DeviceMesh((count,), (BATCH_AXIS,), devices)
    return keras.distribution.DeviceMesh(
        (count // fsdp_devices, fsdp_devices), (BATCH_AXIS, MODEL_AXIS), devices
    )


def data_shard(batch_size, fsdp_devices=1, devices=None):
    """`(index, count)`: which of `count` equal row blocks of each global batch this process loads.

    The rows are those the batch's layout places on this process's devices
    (`jax.make_array_from_process_local_data` then assembles the global
    batch from each process's block). Processes whose devices share a batch
    shard load the same block. `(0, 1)` on one process.

    Raises:
        ValueError: the layout gives a process rows that are not one block
            of the batch (a device order no process split matches).

    Example:
    >>> data_shard(32)  # one process
    (0, 1)
    """
    if keras.backend.backend() != "jax":
        return (0, 1)
    import jax

    if jax.process_count() == 1:
        return (0, 1)
    mesh = device_mesh(fsdp_devices, devices)
    layout = keras.distribution.TensorLayout([BATCH_AXIS], mesh).backend_layout
    rows = {}
    for device, index in layout.devices_indices_map((batch_size,)).items():
        start, stop, _ = index[0].indices(batch_size)
        rows.setdefault(device.process_index, []).append((start, stop))
    blocks = {p: (min(r[0] for r in spans), max(r[1] for r in spans)) for p, spans in rows.items()}
    mine = blocks[jax.process_index()]
    size = mine[1] - mine[0]
    count = batch_size // size
    covered = sum(stop - start for start, stop in set(rows[jax.process_index()]))
    if mine[0] % size or covered != size or any(b[1] - b[0] != size for b in blocks.values()):
        raise ValueError(
            f"the batch's layout gives process {jax.process_index()} rows {mine[0]}..{mine[1]} "
            f"of {batch_size}, not one of equal blocks: order the devices by process."
        )
    return (mine[0] // size, count)


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
    mesh = device_mesh(fsdp_devices, devices)
    if fsdp_devices == 1:
        if len(devices) == 1:
            return None
        # Our loader gives each process its own rows (`data_shard`): Keras shards no dataset.
        return keras.distribution.DataParallel(device_mesh=mesh, auto_shard_dataset=False)
    if variables is None:
        raise ValueError("sharding weights (fsdp_devices > 1) needs the model's variables.")
    min_bytes = MIN_SHARD_BYTES if min_bytes is None else min_bytes
    axis = BATCH_AXIS if fsdp_devices == len(devices) else MODEL_AXIS
    layout_map = fsdp_layout_map(variables, mesh, axis, min_bytes)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name=BATCH_AXIS, auto_shard_dataset=False
    )
