"""Writing a Keras π0 / π0.5 / π0-FAST model as an openpi `params/` checkpoint that openpi's `restore_params` loads."""

import os
import shutil

import numpy as np

from keras_openpi.backend.keras_private import flatten_layers
from keras_openpi.convert.openpi_lora import lora_weight_map
from keras_openpi.convert.pi0_fast_weights import pi0_fast_weight_map
from keras_openpi.convert.pi0_weights import pi0_weight_map
from keras_openpi.convert.weight_slices import merged_values
from keras_openpi.convert.weight_slices import raw_values
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


def to_openpi_params(model, dtype="float32", keep_lora=False):
    """The flat openpi parameters of a model: `{openpi_path: array}` in openpi's layout.

    The inverse of `load_pi0_weights` / `load_pi0_fast_weights`: depth-stacked
    arrays are rebuilt from the per-layer weights; LoRA adapters are merged,
    or with `keep_lora` written unmerged as openpi's `lora_a` / `lora_b`.

    Args:
        model: a `Pi0` or `Pi0Fast`.
        dtype: `"float32"` or `"bfloat16"` arrays.
        keep_lora: write the adapters as openpi's LoRA weights beside the
            unmerged base weights (adapters in openpi's form only; see
            `FinetuningMixin.enable_lora`).

    Returns:
        dict mapping paths like `PaliGemma/llm/layers/attn/q_einsum/w` to arrays.

    Raises:
        ValueError: an unknown dtype, a quantized model, or `keep_lora` for
            a model without adapters or with Keras-form ones.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    numpy_dtype = np.dtype(dtype) if dtype == "float32" else np.dtype(_bfloat16())
    entries = _weight_map(model)
    if keep_lora:
        _check_openpi_form(model)
        value = raw_values(model)
        entries = entries + lora_weight_map(entries)
    else:
        value = merged_values(model)
    parts = {}
    for openpi_path, index, _, variable in weight_slices(model, entries):
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


def _check_openpi_form(model):
    adapted = [
        layer
        for layer in flatten_layers(model, include_self=False)
        if getattr(layer, "lora_enabled", False)
    ]
    if not adapted:
        raise ValueError(
            f"--keep-lora: {model.name!r} has no LoRA adapters to write; export it without --keep-lora."
        )
    keras_form = [layer.path for layer in adapted if getattr(layer, "lora_form", "keras") != "openpi"]
    if keras_form:
        raise ValueError(
            f"--keep-lora writes openpi's LoRA weights, and {keras_form[0]!r} has Keras-form "
            "adapters (one B shared by all heads, every update scaled by alpha / rank), which "
            "openpi's layout cannot hold: export merged (without --keep-lora), or fine-tune "
            "with form='openpi'."
        )


def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def export_openpi(model, output, dtype="float32", keep_lora=False):
    """Writes `output/params/`, an orbax checkpoint of openpi's exact parameter tree.

    The tree is `{"params": {...}}` saved with orbax's `PyTreeCheckpointer`, the
    format of openpi's released `params/` directories: `restore_params` and
    `serve_policy.py --policy.dir=output` read it (with the config's assets).

    With `keep_lora`, openpi-form adapters are written unmerged as openpi's
    `lora_a` / `lora_b` arrays: openpi restores them into a config whose
    Gemma variants have LoRA of the same ranks (`gemma_2b_lora`: 16,
    `gemma_300m_lora`: 32) and alpha (openpi's: alpha = rank; the
    checkpoint stores no alpha).

    Args:
        model: a `Pi0` or `Pi0Fast`.
        output: a directory that does not exist yet (made whole or not at all).
        dtype: `"float32"` (what openpi trains in) or `"bfloat16"`.
        keep_lora: write LoRA adapters unmerged (see `to_openpi_params`);
            otherwise they are merged into their kernels.

    Raises:
        FileExistsError: `output` exists.
        ValueError: not a π model, a quantized model, an unknown dtype, or
            `keep_lora` without openpi-form adapters.
    """
    import orbax.checkpoint as ocp

    output = os.fspath(output)
    if os.path.exists(output):
        raise FileExistsError(f"{output!r} exists; choose a new output directory.")
    tree = {"params": unflatten_dict(to_openpi_params(model, dtype, keep_lora))}
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
