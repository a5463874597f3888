"""A checkpoint's named arrays in orbax's OCDBT format: each process writes and reads its shards.

    arrays/                     one orbax checkpoint (`CompositeCheckpointHandler`)
      model_weights/            a flat tree {variable path: array} per item (OCDBT):
      ema_weights/                ocdbt.process_<i>/ holds process i's shards,
      optimizer/                  manifest.ocdbt and _METADATA index them
      _CHECKPOINT_METADATA

Writing is collective: on several processes (JAX's multi-controller
runtime) each writes the shards it holds (a replicated array once), and
orbax merges their indexes when all are done. Reading places each array
with the sharding asked for, so a checkpoint restores onto another mesh or
process count; `local=True` reads whole arrays as numpy on this process
alone (serving, export). Nothing here imports Keras' training code; on
PyTorch and TensorFlow the arrays are numpy and JAX stays on the CPU.
"""

import pathlib

import keras
import numpy as np

ARRAYS_DIR = "arrays"
WEIGHTS_ITEM = "model_weights"
EMA_ITEM = "ema_weights"
OPTIMIZER_ITEM = "optimizer"


class ArraysError(ValueError):
    """A checkpoint's arrays cannot be read (missing, truncated, corrupt files) or written."""


def _orbax():
    import jax

    if keras.backend.backend() != "jax":
        # orbax writes through JAX; keep JAX off the accelerators another backend uses.
        jax.config.update("jax_platforms", "cpu")
    import orbax.checkpoint as ocp

    return ocp


def _local_options(ocp):
    import jax

    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


def write_items(directory, items):
    """Writes `{item: {name: array}}` as one orbax checkpoint at `directory` (which must not exist).

    Every process calls it with the same names; a JAX array sharded over
    several processes is written by the processes holding its shards.

    Args:
        directory: the checkpoint's `arrays` folder.
        items: `{item name: {array name: array}}`; JAX arrays or numpy arrays.

    Raises:
        OSError, ArraysError: a file could not be written.
    """
    ocp = _orbax()
    handler = ocp.CompositeCheckpointHandler()
    args = ocp.args.Composite(
        **{item: ocp.args.PyTreeSave(arrays) for item, arrays in items.items()}
    )
    checkpointer = ocp.Checkpointer(handler)
    try:
        checkpointer.save(pathlib.Path(directory), args=args)
    except ValueError as error:  # what tensorstore raises for a failed write
        raise ArraysError(f"orbax could not write the arrays: {error}") from None
    finally:
        checkpointer.close()


def array_specs(directory, item):
    """`{name: (shape, dtype name)}` of the arrays of `item` in the `arrays` folder `directory`.

    Raises:
        ArraysError: the item's index cannot be read.
    """
    ocp = _orbax()
    path = pathlib.Path(directory) / item
    try:
        tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArraysError(f"{path} cannot be read as arrays: {error}") from None
    return {
        name: (tuple(int(d) for d in meta.shape), np.dtype(meta.dtype).name)
        for name, meta in tree.items()
    }


def read_items(directory, requests, local=False):
    """Reads arrays of several items: `{item: {name: array}}`.

    Args:
        directory: the `arrays` folder.
        requests: `{item: {name: sharding}}` (some or all of the item's arrays);
            a `jax.sharding.Sharding` places
            the array as that (the shards this process holds are read),
            None gives a numpy array of the whole.
        local: this process reads alone (no other process takes part);
            every sharding must then be None.

    Raises:
        ArraysError: a file cannot be read.
    """
    ocp = _orbax()
    directory = pathlib.Path(directory)
    options = _local_options(ocp) if local else ocp.options.MultiprocessingOptions()
    out = {}
    for item, names in requests.items():
        restore_args = {}
        for name, sharding in names.items():
            if sharding is None:
                restore_args[name] = ocp.RestoreArgs(restore_type=np.ndarray)
            else:
                restore_args[name] = ocp.ArrayRestoreArgs(sharding=sharding)
        handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=options)
        try:
            restored = handler.restore(
                directory / item,
                # `item` names the arrays to read (a None leaf would read as None).
                args=ocp.args.PyTreeRestore(
                    item=dict.fromkeys(restore_args, 0),
                    restore_args=restore_args,
                    partial_restore=True,
                ),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ArraysError(f"{directory / item} cannot be read as arrays: {error}") from None
        finally:
            handler.close()
        out[item] = dict(restored)
    return out
