"""LoRA on a model's declared linear maps, in Keras' form or openpi's, and merging.

A model's LoRA configuration is `{target: {"rank": r, "alpha": a}}`, plus
`"form": "openpi"` for openpi's form (no key: Keras' form; see
`keras_openpi.layers.LowRankAdaptationMixin` for both).
"""

import numbers

from keras_openpi.backend.keras_private import flatten_layers
from keras_openpi.finetuning.freezing import set_trainable
from keras_openpi.finetuning.groups import declared_groups
from keras_openpi.finetuning.groups import default_lora_targets
from keras_openpi.finetuning.groups import is_adapter
from keras_openpi.finetuning.memory import frozen_heap
from keras_openpi.layers.lora_dense import LowRankAdaptationMixin
from keras_openpi.layers.lora_dense import check_lora_form


def _per_target(value, name, target):
    if isinstance(value, dict):
        if target not in value:
            raise ValueError(
                f"LoRA {name} is given per target {sorted(value)} but not for {target!r}."
            )
        return value[target]
    return value


def lora_form(spec):
    """The form of one target's LoRA configuration (`"keras"` when it names none)."""
    return spec.get("form", "keras")


def resolve_lora_config(model, rank=16, alpha=None, targets=None, form="keras"):
    """`{target: {"rank": r, "alpha": a[, "form": "openpi"]}}` from `enable_lora`'s arguments.

    Args:
        model: a model declaring `finetuning_groups()` and `default_lora_targets()`.
        rank: a positive int, a dict per target, or `"openpi"` (each group's
            `openpi_lora_rank`: 16 for the VLM, 32 for π0's action expert, as
            openpi's `gemma_2b_lora` and `gemma_300m_lora` variants).
        alpha: the scale numerator (the update is `alpha / rank * A @ B`): a
            number, a dict per target, or None for alpha = rank (openpi's value).
        targets: group names whose declared linear maps get adapters; None
            for the model's `default_lora_targets()`.
        form: `"keras"` (Keras' `enable_lora`: one B shared by the heads,
            every update scaled by alpha / rank) or `"openpi"` (openpi's
            `lora.Einsum` and `FeedForward`: a B per head, feed-forward
            updates not scaled).
    """
    check_lora_form(form)
    if targets is None:
        targets = default_lora_targets(model)
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
            target_rank = groups[target]["openpi_lora_rank"]
            if target_rank is None:
                raise ValueError(f"openpi defines no LoRA rank for {target!r}.")
            default_alpha = target_rank
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
        if form != "keras":
            config[target]["form"] = form
    return config


def add_adapters(model, lora_config):
    """Enables LoRA on every declared linear map of each target and freezes the rest of the target.

    Every layer is checked before any changes. What ends frozen is openpi's
    set for its `*_lora` variants (see `freeze_lora_targets`).
    """
    groups = declared_groups(model)
    for target, spec in lora_config.items():
        form = check_lora_form(lora_form(spec))
        for layer in groups[target]["lora"]:
            if not isinstance(layer, LowRankAdaptationMixin):
                raise ValueError(
                    f"{layer.path!r} is a {type(layer).__name__}; LoRA targets must be "
                    "keras_openpi.layers.LoRADense / LoRAEinsumDense (Keras' own layers "
                    "lose their adapters when saved)."
                )
            if layer.lora_enabled:
                raise ValueError(
                    f"{layer.path!r} already has LoRA adapters; enable LoRA once per model "
                    "(merge_lora() first to start again)."
                )
            if form == "openpi" and layer.quantization_mode is not None:
                raise ValueError(
                    f"{layer.path!r} is quantized ({layer.quantization_mode}); openpi's LoRA "
                    "form adapts float kernels (use form='keras' with quantized bases)."
                )
    for target, spec in lora_config.items():
        for layer in groups[target]["lora"]:
            layer.trainable = True
            layer.enable_lora(spec["rank"], lora_alpha=spec["alpha"], form=lora_form(spec))
    freeze_lora_targets(model, lora_config)


def freeze_lora_targets(model, lora_config):
    """Freezes every weight of the LoRA targets except the adapters.

    That is openpi's set for its `*_lora` variants (its `get_freeze_filter`:
    everything of an adapted Gemma expert but `.*lora.*`): base kernels,
    norms, the VLM's token embedding, π0.5's adaRMS projections. Other groups
    are untouched.
    """
    groups = declared_groups(model)
    for target in lora_config:
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
        for layer in flatten_layers(model, include_self=False)
        if getattr(layer, "lora_enabled", False)
    ]


def merge_adapters(model):
    """Folds each adapter's update into its kernel and removes the adapters.

    Float kernels are merged in float32 (then stored in the kernel's dtype);
    int8 kernels are dequantized, merged and requantized by Keras. The merged
    kernels keep their frozen flag (see `LowRankAdaptationMixin.merge_lora`).
    """
    with frozen_heap():  # Keras collects garbage at every deleted variable
        for layer in adapted_layers(model):
            if not isinstance(layer, LowRankAdaptationMixin):
                raise ValueError(
                    f"{layer.path!r} is a {type(layer).__name__} with Keras' own LoRA; "
                    "keras_openpi merges the adapters of LoRADense / LoRAEinsumDense layers."
                )
            layer.merge_lora()
