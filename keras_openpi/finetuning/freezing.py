"""Freezing weights by group or by regular expression over variable paths.

Freezing is Keras' own: a frozen weight has `variable.trainable = False`, so it
is left out of `model.trainable_variables`; the trainer differentiates only
with respect to those, and the optimizer builds its slots only for them.
`layer.trainable = False` on any sub-layer works the same way and composes
with everything here.
"""

from keras_openpi.backend.keras_private import flatten_layers
from keras_openpi.finetuning.groups import declared_groups
from keras_openpi.finetuning.groups import is_locked
from keras_openpi.finetuning.groups import match_weights
from keras_openpi.finetuning.groups import owning_layers
from keras_openpi.finetuning.groups import relative_path


def set_trainable(variables, trainable):
    for variable in variables:
        variable.trainable = trainable


def group_layers(model, groups):
    """The declared layers of `groups` (names), with a clear error for unknown names."""
    declared = declared_groups(model)
    layers = []
    for name in groups:
        if name not in declared:
            raise ValueError(
                f"Unknown fine-tuning group {name!r} for {type(model).__name__}; "
                f"expected one of {sorted(declared)}."
            )
        layers.extend(declared[name]["layers"])
    return layers


def select_weights(model, patterns=(), groups=()):
    """Weights of the named groups plus those whose relative path fully matches a pattern."""
    selected = [v for layer in group_layers(model, groups) for v in layer.weights]
    if patterns:
        selected.extend(match_weights(model, patterns))
    return selected


def freeze(model, patterns=(), groups=()):
    """Freezes the weights of `groups` and those matching `patterns` (see `select_weights`)."""
    set_trainable(select_weights(model, patterns, groups), False)


def unfreeze(model, patterns=(), groups=()):
    """Unfreezes the selected weights, except quantized ones and LoRA base kernels."""
    owners = owning_layers(model)
    selected = select_weights(model, patterns, groups)
    set_trainable([v for v in selected if not is_locked(v, owners[id(v)])], True)


def unfreeze_all(model):
    """Every layer and every weight trainable again, except quantized ones and LoRA base kernels."""
    model.trainable = True
    owners = owning_layers(model)
    set_trainable([v for v in model.weights if is_locked(v, owners[id(v)])], False)


def frozen_record(model):
    """`(frozen layer paths, frozen weight paths)`, relative to the model."""
    layers = [
        relative_path(model, layer.path)
        for layer in flatten_layers(model, include_self=False)
        if not layer.trainable and layer.path
    ]
    weights = [relative_path(model, v.path) for v in model.weights if not v.trainable]
    return layers, weights


def restore_frozen(model, frozen_layers, frozen_weights):
    """Sets exactly the recorded frozen layers and weights (inverse of `frozen_record`)."""
    frozen_layers, frozen_weights = set(frozen_layers), set(frozen_weights)
    for layer in flatten_layers(model, include_self=False):
        if layer.path and relative_path(model, layer.path) in frozen_layers:
            layer.trainable = False
    owners = owning_layers(model)
    for variable in model.weights:
        frozen = relative_path(model, variable.path) in frozen_weights
        if frozen or not is_locked(variable, owners[id(variable)]):
            variable.trainable = not frozen
