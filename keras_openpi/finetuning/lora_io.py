"""Saving LoRA models: unmerged adapters in `.keras` files, and small adapter files.

Keras 3.15's `Dense` / `EinsumDense` write `kernel + alpha / rank * A @ B` as
their kernel when saved and assign zeros to A and B when loaded, so a reloaded
LoRA model has lost its adapters: with B = 0 and A = 0 both get a zero gradient
forever. `keep_adapters_on_save` replaces, on one adapted layer, the two hooks
Keras documents for taking control of a layer's saving (`save_own_variables`,
`load_own_variables`) by ones that write and read every weight of the layer
as it is, keyed by name: the frozen base kernel (float, or int8 with its
scale), A and B. Nothing else changes: the file is a standard `.keras` /
`.weights.h5`, and `model.get_config()` records the LoRA configuration so that
`from_config` re-creates the adapters before the weights load.
"""

import functools
import json

import numpy as np

from keras_openpi.finetuning.groups import relative_path

FORMAT = "keras_openpi.lora_weights/1"
META_KEY = "__meta__"


def keep_adapters_on_save(layer):
    """Makes `layer` (LoRA enabled) save and load its unmerged weights."""
    layer.save_own_variables = functools.partial(_save_unmerged, layer)
    layer.load_own_variables = functools.partial(_load_unmerged, layer)


def drop_save_hooks(layer):
    """Restores Keras' own saving on `layer` (after its adapters were merged)."""
    for name in ("save_own_variables", "load_own_variables"):
        if name in vars(layer):
            delattr(layer, name)


def _save_unmerged(layer, store):
    for variable in layer.weights:
        store[variable.name] = variable


def _load_unmerged(layer, store):
    weights = {variable.name: variable for variable in layer.weights}
    found = sorted(store.keys())
    if found != sorted(weights):
        raise ValueError(
            f"Cannot load the LoRA layer {layer.path!r}: the file holds the weights "
            f"{found}, the layer has {sorted(weights)}. Files saved by Keras' own LoRA "
            "(adapters merged into the kernel) load into a model without adapters; "
            "call `enable_lora` after loading them."
        )
    for name, variable in weights.items():
        value = store[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"{variable.path!r} has shape {tuple(variable.shape)}, the file "
                f"holds {tuple(value.shape)}."
            )
        variable.assign(value)


def save_lora_weights(model, path, finetuning_config):
    """Writes the trainable weights of `model` (adapters included) to an `.npz` file.

    Args:
        model: the fine-tuned model.
        path: the file to write (written as is, whatever its suffix).
        finetuning_config: the model's fine-tuning record, stored alongside so
            that `load_lora_weights` can re-create the adapters on a base model.
    """
    arrays = {}
    for variable in model.trainable_weights:
        value = np.asarray(variable.numpy())
        if value.dtype.kind == "V" or str(value.dtype) == "bfloat16":
            value = value.astype(np.float32)
        arrays[relative_path(model, variable.path)] = value
    if not arrays:
        raise ValueError(f"{model.name!r} has no trainable weights to save.")
    meta = {"format": FORMAT, "model": model.name, "finetuning": finetuning_config}
    arrays[META_KEY] = np.array(json.dumps(meta))
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def read_lora_weights(path):
    """`(meta, {relative path: array})` from a file written by `save_lora_weights`."""
    with np.load(path, allow_pickle=False) as data:
        if META_KEY not in data.files:
            raise ValueError(
                f"{path} is not a keras_openpi LoRA weights file (no {META_KEY!r} entry)."
            )
        meta = json.loads(str(data[META_KEY]))
        arrays = {k: data[k] for k in data.files if k != META_KEY}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} has format {meta.get('format')!r}; expected {FORMAT!r}."
        )
    return meta, arrays


def assign_lora_weights(model, arrays, path):
    """Assigns `arrays` to the trainable weights of `model`, which must match exactly."""
    weights = {relative_path(model, v.path): v for v in model.trainable_weights}
    missing = sorted(set(weights) - set(arrays))
    unexpected = sorted(set(arrays) - set(weights))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the trainable weights of {model.name!r}: "
            f"{len(missing)} missing from the file {missing[:5]}, {len(unexpected)} "
            f"not trainable in the model {unexpected[:5]}. Apply the same fine-tuning "
            "strategy (LoRA targets, frozen groups) before loading."
        )
    for name, variable in weights.items():
        if tuple(arrays[name].shape) != tuple(variable.shape):
            raise ValueError(
                f"{path}: {name!r} has shape {tuple(arrays[name].shape)}, the model's "
                f"weight has shape {tuple(variable.shape)} (a different rank or model size?)."
            )
    for name, variable in weights.items():
        variable.assign(arrays[name])
