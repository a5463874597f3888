"""Small adapter files: the trainable weights of a fine-tuned model and its fine-tuning record.

(`.keras` and `.weights.h5` files keep LoRA adapters unmerged through the
layers themselves: see `keras_openpi.layers.LowRankAdaptationMixin`.)
"""

import json

import numpy as np

from keras_openpi.finetuning.groups import relative_path

FORMAT = "keras_openpi.lora_weights/1"
META_KEY = "__meta__"


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
