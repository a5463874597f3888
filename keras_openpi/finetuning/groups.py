"""A model's fine-tuning groups: which weights are vision, VLM, action expert, projections.

A model taking part in fine-tuning declares its groups with a method
`finetuning_groups()` returning `{group: {"layers": [...], "lora": [...],
"openpi_lora_rank": r}}`: `layers` are the layers whose weights (nested ones
included) form the group, `lora` the linear maps (`LoRADense` /
`LoRAEinsumDense`) that LoRA adapts when the group is a LoRA target (groups
without `lora` cannot be targeted), `openpi_lora_rank` the rank (and alpha)
of openpi's LoRA variant for the group, if it has one. It also declares
`default_lora_targets()`, the groups `enable_lora` and the `lora` strategy
adapt. Every function here works from these declarations only, so that every
model (π0, π0.5, π0-FAST) gets the same strategies.
"""

import re

import keras

from keras_openpi.backend.keras_private import flatten_layers

# The pseudo-group of LoRA adapter matrices in summaries (they live inside the
# layers of their target group, but are counted apart).
ADAPTER_GROUP = "lora_adapters"
ADAPTER_NAMES = ("lora_kernel_a", "lora_kernel_b")
OTHER_GROUP = "other"
LORA_BASE_NAMES = ("kernel", "embeddings")
GROUP_KEYS = ("layers", "lora", "openpi_lora_rank")


def relative_path(model, path):
    """`pi0/gemma/token_embedding/embeddings` -> `gemma/token_embedding/embeddings`."""
    prefix = f"{model.name}/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def is_adapter(variable):
    """True for the A and B matrices that `enable_lora` adds."""
    return variable.name in ADAPTER_NAMES


def is_locked(variable, layer):
    """Weights that a strategy never unfreezes: quantized kernels and their
    scales (everything of a quantized layer but its bias) and LoRA base kernels.

    Args:
        variable: a weight.
        layer: the layer that owns it (see `owning_layers`).
    """
    if not keras.backend.is_float_dtype(variable.dtype):
        return True
    if getattr(layer, "quantization_mode", None) and variable.name != "bias":
        return True
    # Keras' `enable_lora` freezes the base kernel (embeddings of an Embedding).
    return bool(getattr(layer, "lora_enabled", False) and variable.name in LORA_BASE_NAMES)


def declared_groups(model):
    """`model.finetuning_groups()`, checked: `{group: {"layers", "lora", "openpi_lora_rank"}}`."""
    if not hasattr(model, "finetuning_groups"):
        raise ValueError(
            f"{type(model).__name__} declares no fine-tuning groups: it needs a "
            "`finetuning_groups()` method returning {group: {'layers': [...], 'lora': [...]}}."
        )
    groups = {}
    for name, spec in model.finetuning_groups().items():
        unknown = set(spec) - set(GROUP_KEYS)
        if unknown or "layers" not in spec:
            raise ValueError(
                f"Fine-tuning group {name!r} must be a dict with keys 'layers' and "
                f"optionally 'lora' and 'openpi_lora_rank'; got keys {sorted(spec)}."
            )
        groups[name] = {
            "layers": list(spec["layers"]),
            "lora": list(spec.get("lora", ())),
            "openpi_lora_rank": spec.get("openpi_lora_rank"),
        }
    return groups


def default_lora_targets(model):
    """`model.default_lora_targets()`, checked against the model's LoRA groups."""
    groups = declared_groups(model)
    targets = tuple(model.default_lora_targets()) if hasattr(model, "default_lora_targets") else ()
    lora_groups = sorted(name for name, spec in groups.items() if spec["lora"])
    bad = [t for t in targets if t not in lora_groups]
    if not targets or bad:
        raise ValueError(
            f"{type(model).__name__}.default_lora_targets() must name groups among "
            f"{lora_groups}; got {list(targets)}."
        )
    return targets


def group_weights(model):
    """`{group: [weights]}` for the declared groups, with adapters in `ADAPTER_GROUP`.

    Weights claimed by no group (none for π0) go to `OTHER_GROUP`; a weight
    claimed by two groups is an error in the model's declaration.
    """
    owner = {}
    for name, spec in declared_groups(model).items():
        for layer in spec["layers"]:
            for variable in layer.weights:
                group = ADAPTER_GROUP if is_adapter(variable) else name
                previous = owner.setdefault(id(variable), group)
                if previous != group:
                    raise ValueError(
                        f"Weight {variable.path!r} is declared in two fine-tuning groups: "
                        f"{previous!r} and {group!r}."
                    )
    weights = {name: [] for name in declared_groups(model)}
    weights[ADAPTER_GROUP] = []
    for variable in model.weights:
        group = owner.get(id(variable))
        if group is None:
            group = ADAPTER_GROUP if is_adapter(variable) else OTHER_GROUP
        weights.setdefault(group, []).append(variable)
    return weights


def owning_layers(model):
    """`{id(weight): layer}`: the layer that holds each weight as its own attribute.

    That is the innermost layer whose `weights` hold it: layers come parents
    first, so the last one seen owns it.
    """
    owners = {}
    for layer in flatten_layers(model):
        for variable in layer.weights:
            owners[id(variable)] = layer
    return owners


def match_weights(model, patterns):
    """The weights whose path relative to the model fully matches one of `patterns`.

    Raises:
        ValueError: a pattern is not a valid regular expression or matches no weight.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = [(relative_path(model, v.path), v) for v in model.weights]
    matched = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"Invalid freeze pattern {pattern!r}: {error}.") from None
        hits = [v for path, v in paths if regex.fullmatch(path)]
        if not hits:
            raise ValueError(
                f"The pattern {pattern!r} matches no weight of {model.name!r}. Patterns "
                "fully match paths relative to the model, e.g. "
                f"{paths[len(paths) // 2][0]!r}."
            )
        matched.extend(hits)
    return matched
