"""Reading the openpi weight maps as `(openpi path, index)` slices, for formats other than openpi's own."""

import numpy as np
from keras import ops

from keras_openpi.backend.keras_private import flatten_layers
from keras_openpi.convert.pi0_weights import _keras_variables


class _Index:
    """Stands in for an openpi array: `select(_Index())` returns the index that `select` takes."""

    def __getitem__(self, index):
        return index if isinstance(index, tuple) else (index,)


def weight_slices(model, entries):
    """`(openpi_path, index, keras_path, variable)` for every weight of `model` in a weight map.

    Args:
        model: a built `Pi0` / `Pi0Fast`.
        entries: its `(openpi_path, keras_path, select)` map (`pi0_weight_map`,
            `pi0_fast_weight_map`); `select` picks `array[index]` of the stacked
            openpi array, `index` being `()` for a whole array, `(i,)` for layer `i`,
            `(i, j)` for part `j` (key/value, gate/up) of layer `i`.

    Returns:
        the slices, in map order.

    Raises:
        ValueError: a model weight (other than LoRA adapters and the noise
            generator's state) that no entry maps.
    """
    variables = _keras_variables(model)
    slices = []
    for openpi_path, keras_path, select in entries:
        if keras_path not in variables:
            continue  # the other norm form (adaRMS vs plain)
        index = select(_Index())
        slices.append((openpi_path, () if isinstance(index, _Index) else index, keras_path, variables[keras_path]))
    mapped = {keras_path for _, _, keras_path, _ in slices}
    missing = sorted(
        path
        for path, variable in variables.items()
        if path not in mapped and "seed_generator" not in path and not variable.name.startswith("lora_kernel")
    )
    if missing:
        raise ValueError(f"No openpi path maps the model weights {missing}.")
    return slices


def _check_float(model):
    """Raises a `ValueError` for a model with a quantized layer; returns its adapted layers."""
    adapted = []
    for layer in flatten_layers(model, include_self=False):
        if getattr(layer, "quantization_mode", None):
            raise ValueError(
                f"{layer.path!r} is quantized ({layer.quantization_mode}); export a model "
                "with float weights (load the .keras file saved before quantizing)."
            )
        if getattr(layer, "lora_enabled", False):
            adapted.append(layer)
    return adapted


def _numpy(value):
    return np.asarray(ops.convert_to_numpy(value))


def merged_values(model):
    """A function `variable -> numpy value`, with each LoRA adapter folded into its kernel.

    The merge is `float32(kernel) + layer.lora_delta()` (the scaled update of
    either LoRA form), stored in the kernel's dtype, as `merge_adapters`
    computes it.

    Raises:
        ValueError: for an int8- or otherwise quantized model (dequantize or
            export before quantizing).
    """
    adapted = {
        id(variable): layer
        for layer in _check_float(model)
        for variable in layer.weights
        if variable.name == "kernel"
    }

    def value(variable):
        layer = adapted.get(id(variable))
        if layer is None:
            return _numpy(variable.value)
        merged = ops.cast(ops.cast(variable.value, "float32") + layer.lora_delta(), variable.dtype)
        return _numpy(merged)

    return value


def raw_values(model):
    """A function `variable -> numpy value`, as stored (LoRA adapters and kernels unmerged).

    Raises:
        ValueError: for a quantized model.
    """
    _check_float(model)
    return lambda variable: _numpy(variable.value)
