"""Reading openpi parameter files: orbax `params/` directories and flat `.npz` files."""

import os

import numpy as np

from keras_openpi.data.transforms import flatten_dict


def _normalize_path(path):
    parts = path.split("/")
    if parts and parts[0] == "params":
        parts = parts[1:]
    if parts and parts[-1] == "value":  # nnx.State leaves saved during training
        parts = parts[:-1]
    return "/".join(parts)


def _read_orbax(path):
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
    )
    return checkpointer.restore(
        path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )


def load_openpi_params(path):
    """Loads openpi parameters into a flat `{openpi_path: float32 array}` dict.

    Args:
        path: an openpi orbax `params/` directory (released or written by
            openpi's training, with or without trailing `value` keys, bfloat16
            frozen weights included) or an `.npz` of flat `/`-joined paths (a
            leading `params/` is ignored; non-parameter entries of the test
            fixtures such as `input/...` are skipped).

    Returns:
        dict mapping paths like `PaliGemma/llm/layers/attn/q_einsum/w` to arrays.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No openpi checkpoint at {path!r}.")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "_METADATA")) and os.path.isdir(
            os.path.join(path, "params")
        ):
            path = os.path.join(path, "params")  # a step directory was given
        flat = flatten_dict(_read_orbax(path))
    else:
        with np.load(path, allow_pickle=False) as data:
            flat = {
                k: data[k]
                for k in data.files
                if not k.startswith(("input/", "output/")) and k != "meta"
            }
    params = {}
    for key, value in flat.items():
        params[_normalize_path(key)] = np.asarray(value).astype(np.float32)
    if not params:
        raise ValueError(f"{path!r} holds no parameters.")
    return params
