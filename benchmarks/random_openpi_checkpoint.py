"""A random π0 / π0.5 checkpoint in openpi's released layout, written one array at a time.

The parameter tree is openpi's exactly (the paths and shapes of
`keras_openpi.convert.pi0_weights.pi0_weight_map`, read from a model built
with `shapes_only()`, so nothing is allocated), saved as openpi's released
`params/` directories are: `{"params": nested dict}` through orbax's
`PyTreeCheckpointer` (OCDBT), every leaf an `np.ndarray` on restore.

Orbax's numpy handler deep-copies the whole tree before writing it, and
needs it in memory first: a full-size π0 would be held twice (13 GB in
bfloat16). Here each leaf is a `RandomArray` (shape, dtype, seed); a
handler registered for that type only (its `typestr` is numpy's, so the
checkpoint restores as numpy arrays) draws one array, writes it with
TensorStore, waits for the write, and drops it before drawing the next:
the process holds at most the largest array (2.4 GB in bfloat16 for
π0: the VLM's stacked gate/up projections).

    write_random_checkpoint("ckpt/params", config, dtype="bfloat16")
"""

import os
import shutil

import numpy as np

SCALE = 0.02  # N(0, 0.02): every weight random, activations stay finite
_BLOCK = 1 << 24  # values drawn per block (64 MB of float32)


class RandomArray:
    """A leaf standing in for `N(0, scale)` values of `shape` and `dtype`, drawn on `generate()`."""

    def __init__(self, shape, dtype, seed, scale=SCALE):
        self.shape, self.dtype, self.seed, self.scale = (
            tuple(shape),
            np.dtype(dtype),
            seed,
            scale,
        )
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize

    def generate(self):
        """The values: `N(0, scale)` drawn in float32 blocks, stored in `dtype`."""
        rng = np.random.default_rng(self.seed)
        out = np.empty(self.shape, self.dtype)
        flat = out.reshape(-1)
        for start in range(0, self.size, _BLOCK):
            count = min(_BLOCK, self.size - start)
            flat[start : start + count] = (
                rng.standard_normal(count, np.float32) * self.scale
            )
        return out


def _handler():
    from orbax.checkpoint._src.futures import future
    from orbax.checkpoint.type_handlers import NumpyHandler, SaveArgs

    class StreamedArrayHandler(NumpyHandler):
        """Writes `RandomArray` leaves one after another, each drawn just before its write."""

        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)

        async def serialize(self, values, infos, args=None):
            args = args or [SaveArgs()] * len(values)
            return [
                future.CommitFutureAwaitingContractedSignals(
                    self._write_one_by_one(values, infos, args), name="random_arrays"
                )
            ]

        async def _write_one_by_one(self, values, infos, args):
            for value, info, arg in zip(values, infos, args):
                array = value.generate()
                await self._background_serialize([array], [info], [arg])
                del array

    return StreamedArrayHandler()


def openpi_shapes(config):
    """`{openpi_path: shape}` of a `Pi0(**config)` in openpi's layout, no weight allocated.

    Args:
        config: `Pi0` arguments (variants, vocabulary, action dim, ...).
    """
    from keras_openpi.convert.pi0_weights import pi0_weight_map
    from keras_openpi.convert.weight_slices import weight_slices
    from keras_openpi.finetuning import shapes_only
    from keras_openpi.models import Pi0

    with shapes_only():
        model = Pi0(**config)
    parts = {}
    for openpi_path, index, _, variable in weight_slices(model, pi0_weight_map(model)):
        parts.setdefault(openpi_path, []).append((index, tuple(variable.shape)))
    shapes = {}
    for openpi_path, slices in parts.items():
        rank = len(slices[0][0])
        lead = tuple(max(index[k] for index, _ in slices) + 1 for k in range(rank))
        shapes[openpi_path] = lead + slices[0][1]
    return shapes


def _nested(flat):
    tree = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return tree


def write_random_checkpoint(output, config, dtype="bfloat16", seed=0):
    """Writes `output` (a `params/` directory) with random weights of `Pi0(**config)`.

    Args:
        output: the `params/` directory to write; must not exist.
        config: `Pi0` arguments.
        dtype: the stored dtype of every array (`"bfloat16"` or `"float32"`).
        seed: the seed of the first array (array `i` uses `seed + i`).

    Returns:
        `{"parameters": count, "arrays": count, "bytes": sum of array bytes}`.

    Raises:
        FileExistsError: `output` exists.
    """
    import ml_dtypes
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization.type_handler_registry import (
        create_type_handler_registry,
    )

    output = os.path.abspath(os.fspath(output))
    if os.path.exists(output):
        raise FileExistsError(f"{output!r} exists; choose a new checkpoint directory.")
    numpy_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    shapes = openpi_shapes(config)
    leaves = {
        path: RandomArray(shape, numpy_dtype, seed + i)
        for i, (path, shape) in enumerate(sorted(shapes.items()))
    }
    registry = create_type_handler_registry((RandomArray, _handler()))
    checkpointer = ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    )
    partial = output + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    try:
        checkpointer.save(partial, {"params": _nested(leaves)})
        os.rename(partial, output)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    return {
        "parameters": sum(leaf.size for leaf in leaves.values()),
        "arrays": len(leaves),
        "bytes": sum(leaf.nbytes for leaf in leaves.values()),
    }
