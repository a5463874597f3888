"""The fine-tuning record in `get_config()`, and rebuilding it in `from_config()`.

A reloaded model is first built by its constructor (all float, all
trainable); `restore_finetuning` then replays, in the order they were made,
the changes that give the weights their saved shapes and dtypes — int8
quantization, LoRA adapters, frozen flags, the frozen-weight dtype, and
rematerialization — so that the weights file loads into exactly the saved
structure.
"""

import dataclasses

import keras

from keras_openpi.backend.keras_private import flatten_layers
from keras_openpi.finetuning.freezing import frozen_record
from keras_openpi.finetuning.freezing import restore_frozen
from keras_openpi.finetuning.groups import relative_path
from keras_openpi.finetuning.lora import add_adapters
from keras_openpi.finetuning.memory import cast_frozen
from keras_openpi.finetuning.memory import quantize_fast
from keras_openpi.finetuning.memory import set_remat


@dataclasses.dataclass
class FinetuningState:
    """What was applied to a model beyond its constructor.

    Args:
        strategy: the name of the last strategy applied, if any.
        lora: `{target: {"rank": r, "alpha": a}}` of the adapters (with
            `"form": "openpi"` for openpi's form).
        frozen_dtype: the dtype frozen weights are stored in, if cast.
        remat: whether `remat_layers()` are rematerialized.
    """

    strategy: str = None
    lora: dict = dataclasses.field(default_factory=dict)
    frozen_dtype: str = None
    remat: bool = False


def _quantized(model):
    groups = {}
    for layer in flatten_layers(model, include_self=False):
        mode = getattr(layer, "quantization_mode", None)
        if mode and layer.path:
            config = keras.saving.serialize_keras_object(
                getattr(layer, "quantization_config", None)
            )
            key = (mode, repr(config))
            entry = groups.setdefault(key, {"mode": mode, "config": config, "layers": []})
            entry["layers"].append(relative_path(model, layer.path))
    return list(groups.values())


def finetuning_config(model, state):
    """The JSON-able record of `model`'s fine-tuning, or None for an untouched model."""
    frozen_layers, frozen_weights = frozen_record(model)
    record = {
        "strategy": state.strategy,
        "quantized": _quantized(model),
        "lora": {k: dict(v) for k, v in state.lora.items()},
        "frozen_layers": frozen_layers,
        "frozen_weights": frozen_weights,
        "frozen_dtype": state.frozen_dtype,
        "remat": state.remat,
    }
    if not any(record.values()):
        return None
    return record


def restore_finetuning(model, record):
    """Replays a record of `finetuning_config` on a freshly built model; returns its state."""
    for entry in record.get("quantized", []):
        names = set(entry["layers"])
        config = keras.saving.deserialize_keras_object(entry["config"])
        quantize_fast(
            model,
            entry["mode"],
            config,
            lambda layer, names=names: bool(layer.path)
            and relative_path(model, layer.path) in names,
        )
    lora = record.get("lora") or {}
    add_adapters(model, lora)
    restore_frozen(model, record.get("frozen_layers", []), record.get("frozen_weights", []))
    if record.get("frozen_dtype"):
        cast_frozen(model, record["frozen_dtype"])
    set_remat(model, record.get("remat", False))
    return FinetuningState(
        strategy=record.get("strategy"),
        lora=lora,
        frozen_dtype=record.get("frozen_dtype"),
        remat=bool(record.get("remat", False)),
    )
