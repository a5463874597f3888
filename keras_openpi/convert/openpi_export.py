"""Writing a Keras π0 / π0.5 / π0-FAST model as an openpi `params/` checkpoint that openpi's `restore_params` loads."""

import os
import shutil

import numpy as np

from keras_openpi.convert.pi0_fast_weights import pi0_fast_weight_map
from keras_openpi.convert.pi0_weights import pi0_weight_map
from keras_openpi.convert.weight_slices import merged_values
from keras_openpi.convert.weight_slices import weight_slices
from keras_openpi.data.transforms import unflatten_dict

DTYPES = ("float32", "bfloat16")


def _weight_map(model):
    from keras_openpi.models import Pi0
    from keras_openpi.models import Pi0Fast

    if isinstance(model, Pi0):
        return pi0_weight_map(model)
    if isinstance(model, Pi0Fast):
        return pi0_fast_weight_map(model)
    raise ValueError(f"openpi export takes a Pi0 or Pi0Fast model, got {type(model).__name__}.")


def to_openpi_params(model, dtype="float32"):
    """The flat openpi parameters of a model: `{openpi_path: array}` in openpi's layout.

    The inverse of `load_pi0_weights` / `load_pi0_fast_weights`: depth-stacked
    arrays are rebuilt from the per-layer weights; LoRA adapters are merged.

    Args:
        model: a `Pi0` or `Pi0Fast`.
        dtype: `"float32"` or `"bfloat16"` arrays.

    Returns:
        dict mapping paths like `PaliGemma/llm/layers/attn/q_einsum/w` to arrays.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    numpy_dtype = np.dtype(dtype) if dtype == "float32" else np.dtype(_bfloat16())
    value = merged_values(model)
    parts = {}
    for openpi_path, index, _, variable in weight_slices(model, _weight_map(model)):
        parts.setdefault(openpi_path, []).append((index, variable))
    params = {}
    for openpi_path, slices in parts.items():
        if slices[0][0] == ():
            params[openpi_path] = value(slices[0][1]).astype(numpy_dtype)
            continue
        lead = tuple(max(index[k] for index, _ in slices) + 1 for k in range(len(slices[0][0])))
        array = np.empty(lead + tuple(slices[0][1].shape), numpy_dtype)
        for index, variable in slices:
            array[index] = value(variable)
        params[openpi_path] = array
    return params


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def export_openpi(model, output, dtype="float32"):
    """Writes `output/params/`, an orbax checkpoint of openpi's exact parameter tree.

    The tree is `{"params": {...}}` saved with orbax's `PyTreeCheckpointer`, the
    format of openpi's released `params/` directories: `restore_params` and
    `serve_policy.py --policy.dir=output` read it (with the config's assets).

    Args:
        model: a `Pi0` or `Pi0Fast` (LoRA adapters are merged).
        output: a directory that does not exist yet (made whole or not at all).
        dtype: `"float32"` (what openpi trains in) or `"bfloat16"`.

    Raises:
        FileExistsError: `output` exists.
        ValueError: not a π model, a quantized model, or an unknown dtype.
    """
    import orbax.checkpoint as ocp

    output = os.fspath(output)
    if os.path.exists(output):
        raise FileExistsError(f"{output!r} exists; choose a new output directory.")
    tree = {"params": unflatten_dict(to_openpi_params(model, dtype))}
    partial = output.rstrip("/") + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    try:
        os.makedirs(partial)
        ocp.PyTreeCheckpointer().save(os.path.abspath(os.path.join(partial, "params")), tree)
        os.rename(partial, output)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    return output
