"""LoRA on a model's declared linear maps, with Keras' own `enable_lora`, and merging."""

import numbers

from keras import ops

from keras_openpi.finetuning.freezing import set_trainable
from keras_openpi.finetuning.groups import declared_groups
from keras_openpi.finetuning.groups import is_adapter
from keras_openpi.finetuning.lora_call import drop_low_rank_call
from keras_openpi.finetuning.lora_call import use_low_rank_call
from keras_openpi.finetuning.lora_io import drop_save_hooks
from keras_openpi.finetuning.lora_io import keep_adapters_on_save
from keras_openpi.finetuning.memory import frozen_heap

# openpi's `gemma_2b_lora` (VLM) and `gemma_300m_lora` (action expert) variants.
OPENPI_LORA = {"vlm": (16, 16.0), "action_expert": (32, 32.0)}


def _per_target(value, name, target):
    if isinstance(value, dict):
        if target not in value:
            raise ValueError(
                f"LoRA {name} is given per target {sorted(value)} but not for {target!r}."
            )
        return value[target]
    return value


def resolve_lora_config(model, rank=16, alpha=None, targets=("vlm", "action_expert")):
    """`{target: {"rank": r, "alpha": a}}` from `enable_lora`'s arguments.

    Args:
        model: a model declaring `finetuning_groups()`.
        rank: a positive int, a dict per target, or `"openpi"` (16 for the VLM,
            32 for the action expert, as openpi's `*_lora` variants).
        alpha: the scale numerator (the update is `alpha / rank * A @ B`): a
            number, a dict per target, or None for alpha = rank (openpi's value).
        targets: group names whose declared linear maps get adapters.
    """
    if isinstance(targets, str):
        targets = (targets,)
    groups = declared_groups(model)
    lora_groups = sorted(name for name, spec in groups.items() if spec["lora"])
    if not targets:
        raise ValueError(f"LoRA needs at least one target among {lora_groups}.")
    config = {}
    for target in targets:
        if target not in lora_groups:
            raise ValueError(
                f"Unknown LoRA target {target!r} for {type(model).__name__}; "
                f"expected one of {lora_groups}."
            )
        if rank == "openpi":
            if target not in OPENPI_LORA:
                raise ValueError(f"openpi defines no LoRA rank for {target!r}.")
            target_rank, default_alpha = OPENPI_LORA[target]
        else:
            target_rank = _per_target(rank, "rank", target)
            default_alpha = target_rank
        if isinstance(target_rank, bool) or not isinstance(target_rank, numbers.Integral) or target_rank < 1:
            raise ValueError(
                f"LoRA rank for {target!r} must be a positive int or 'openpi', got {target_rank!r}."
            )
        target_alpha = _per_target(alpha, "alpha", target)
        if target_alpha is None:
            target_alpha = default_alpha
        if isinstance(target_alpha, bool) or not isinstance(target_alpha, numbers.Real) or target_alpha <= 0:
            raise ValueError(
                f"LoRA alpha for {target!r} must be a positive number, got {target_alpha!r}."
            )
        config[target] = {"rank": int(target_rank), "alpha": float(target_alpha)}
    return config


def add_adapters(model, lora_config):
    """Enables LoRA on every declared linear map of each target and freezes the rest of the target.

    What ends frozen is openpi's set for its `*_lora` variants: every weight of
    a target group except the adapters (base kernels, norms, the VLM's token
    embedding, π0.5's adaRMS projections). Other groups are untouched.
    """
    groups = declared_groups(model)
    for target, spec in lora_config.items():
        for layer in groups[target]["lora"]:
            if getattr(layer, "lora_enabled", False):
                raise ValueError(
                    f"{layer.path!r} already has LoRA adapters; enable LoRA once per model "
                    "(merge_lora() first to start again)."
                )
            layer.trainable = True
            layer.enable_lora(spec["rank"], lora_alpha=spec["alpha"])
            keep_adapters_on_save(layer)
            use_low_rank_call(layer)
        frozen = [
            v
            for layer in groups[target]["layers"]
            for v in layer.weights
            if not is_adapter(v)
        ]
        set_trainable(frozen, False)


def adapted_layers(model):
    """The layers of `model` with LoRA enabled."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    ]


def merge_adapters(model):
    """Folds `alpha / rank * A @ B` into each adapted kernel and removes the adapters.

    Float kernels are merged in float32 (then stored in the kernel's dtype);
    int8 kernels are dequantized, merged and requantized by Keras. The merged
    kernels keep their frozen flag.
    """
    with frozen_heap():  # Keras collects garbage at every deleted variable
        for layer in adapted_layers(model):
            _merge(layer)


def _merge(layer):
    scale = layer.lora_alpha / layer.lora_rank
    delta = scale * ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
    if layer.quantization_mode is None:
        kernel = layer._kernel
        kernel.assign(ops.cast(kernel.value, "float32") + delta)
    elif layer.quantization_mode == "int8":
        kernel, kernel_scale, _ = layer._get_kernel_with_merged_lora()
        layer._kernel.assign(kernel)
        layer.kernel_scale.assign(kernel_scale)
    else:
        raise NotImplementedError(
            f"Merging LoRA into a {layer.quantization_mode!r} kernel ({layer.path!r}) "
            "is not supported."
        )
    del layer.lora_kernel_a
    del layer.lora_kernel_b
    layer.lora_enabled = False
    layer.lora_rank = None
    layer.lora_alpha = None
    drop_save_hooks(layer)
    drop_low_rank_call(layer)
