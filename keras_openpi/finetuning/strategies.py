"""Named fine-tuning strategies, applicable from Python or from a training config."""

import dataclasses
import json

from keras_openpi.finetuning.freezing import freeze
from keras_openpi.finetuning.freezing import group_layers
from keras_openpi.finetuning.freezing import unfreeze_all
from keras_openpi.finetuning.groups import declared_groups
from keras_openpi.finetuning.groups import default_lora_targets
from keras_openpi.finetuning.lora import add_adapters
from keras_openpi.finetuning.lora import adapted_layers
from keras_openpi.finetuning.lora import freeze_lora_targets
from keras_openpi.finetuning.lora import resolve_lora_config
from keras_openpi.finetuning.memory import cast_frozen
from keras_openpi.finetuning.memory import quantization_mode
from keras_openpi.finetuning.memory import quantize_layers
from keras_openpi.finetuning.memory import set_remat
from keras_openpi.layers.lora_dense import check_lora_form


@dataclasses.dataclass(frozen=True)
class Strategy:
    """What a named strategy adapts and freezes.

    Args:
        name: the strategy's name.
        lora_targets: groups that get LoRA adapters (their other weights
            freeze); `DEFAULT_LORA_TARGETS` for the model's own
            `default_lora_targets()`.
        frozen_groups: groups frozen entirely.
        description: one line for humans.
    """

    name: str
    lora_targets: object = ()
    frozen_groups: tuple = ()
    description: str = ""


# The `lora_targets` of a strategy that adapts what the model declares
# (`default_lora_targets()`: π0 and π0.5 the VLM and the action expert, π0-FAST its Gemma).
DEFAULT_LORA_TARGETS = "default"

STRATEGIES = {
    s.name: s
    for s in (
        Strategy("full", description="every weight trains (openpi's default)"),
        Strategy(
            "lora",
            lora_targets=DEFAULT_LORA_TARGETS,
            description="LoRA on the model's default targets (π0: the VLM and the action "
            "expert, openpi's gemma_2b_lora + gemma_300m_lora; π0-FAST: its Gemma, "
            "gemma_2b_lora); vision and projections train",
        ),
        Strategy(
            "lora_vlm",
            lora_targets=("vlm",),
            description="LoRA on the VLM; the action expert, vision and projections train fully",
        ),
        Strategy(
            "lora_action_expert",
            lora_targets=("action_expert",),
            description="LoRA on the action expert; the VLM, vision and projections train fully",
        ),
        Strategy(
            "action_expert_only",
            frozen_groups=("vision", "vlm"),
            description="vision and VLM frozen; the action expert and projections train",
        ),
        Strategy(
            "frozen_vision",
            frozen_groups=("vision",),
            description="the SigLIP encoder frozen; everything else trains",
        ),
    )
}


def apply_strategy(
    model,
    strategy="full",
    *,
    rank="openpi",
    alpha=None,
    form="keras",
    freeze_vision=False,
    freeze_patterns=(),
    frozen_dtype=None,
    quantize=None,
    remat=False,
):
    """Sets what `model` trains, from a strategy name or a training-config dict.

    The strategy defines the whole trainable state: the model starts fully
    trainable, then gets, in this order, int8 frozen bases (`quantize`), LoRA
    adapters, frozen groups, frozen patterns, frozen weights cast to
    `frozen_dtype`, and rematerialization. A model that has adapters already
    (a `.keras` file of a LoRA run, an openpi LoRA checkpoint converted with
    `--keep-lora`) keeps them, values included, when the strategy asks for
    exactly those (same targets, ranks, alphas and form): training continues
    from them. Apply it before `compile` (or compile again afterwards).

    Args:
        model: a model with `FinetuningMixin` (π0, π0.5, π0-FAST).
        strategy: a name in `STRATEGIES`, or a dict `{"name": ..., **options}`
            with the options below (as a training config would give them).
        rank: LoRA rank, per target dict, or `"openpi"` (VLM 16, π0's action expert 32).
        alpha: LoRA alpha (None: equal to the rank, scale 1, as openpi).
        form: `"keras"` (Keras' `enable_lora`, one B shared by an einsum's
            heads) or `"openpi"` (openpi's per-head B and scaling rules; see
            `FinetuningMixin.enable_lora`). `rank="openpi", form="openpi"` is
            openpi's `gemma_2b_lora` + `gemma_300m_lora` exactly.
        freeze_vision: also freeze the SigLIP encoder (openpi's LoRA trains it).
        freeze_patterns: regular expressions; weights whose path relative to
            the model fully matches one freeze too (e.g. `"gemma/decoder_block_(1[0-7])/vlm/.*"`).
        frozen_dtype: store frozen weights in this dtype (`"bfloat16"`, as openpi).
        quantize: quantize the frozen linear maps and embeddings of the LoRA
            targets and frozen groups before adding adapters (QLoRA-style):
            `"int8"` (Keras' default: int8 weights and activations),
            `"int8_weight_only"` (int8 weights, float activations) or a
            `keras.quantizers.QuantizationConfig`.
        remat: rematerialize the model's `remat_layers()` (decoder and SigLIP
            blocks) in training. Needed at full size with bfloat16 frozen
            weights on a CPU: there XLA computes bf16 products in float32 and,
            without remat, keeps the float32 copy of every frozen kernel for
            the backward pass (README, "The full-size path"). The training
            configs' LoRA sets it.

    Returns:
        the `Strategy` applied.

    Example:
    >>> strategy = apply_strategy(model, {"name": "lora", "frozen_dtype": "bfloat16"})
    >>> model.trainable_summary()["lora_adapters"]["trainable"] > 0
    True
    """
    if isinstance(strategy, dict):
        options = dict(strategy)
        if "name" not in options:
            raise ValueError(
                f"A strategy dict needs a 'name' among {sorted(STRATEGIES)}; got keys {sorted(options)}."
            )
        name = options.pop("name")
        if isinstance(options.get("freeze_patterns"), str):
            options["freeze_patterns"] = [options["freeze_patterns"]]
        try:
            return apply_strategy(model, name, **options)
        except TypeError as error:
            raise ValueError(f"Bad strategy options {sorted(options)}: {error}.") from None
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown fine-tuning strategy {strategy!r}; expected one of {sorted(STRATEGIES)} "
            "or a dict {'name': ..., **options}."
        )
    spec = STRATEGIES[strategy]
    check_lora_form(form)
    state = model.finetuning_state
    if state.frozen_dtype:
        raise ValueError(
            f"{model.name!r} already stores frozen weights in {state.frozen_dtype}; apply the "
            "strategy to a float model (frozen_dtype is one of its options)."
        )
    frozen_groups = spec.frozen_groups + (("vision",) if freeze_vision else ())
    lora_targets = _model_lora_targets(model, spec, frozen_groups)
    lora_config = (
        resolve_lora_config(model, rank, alpha, lora_targets, form) if lora_targets else {}
    )
    keep_adapters = bool(adapted_layers(model))
    if keep_adapters:
        _check_kept_adapters(model, strategy, lora_config, quantize)
    if quantize:
        quantization_mode(quantize)  # validated before anything changes
    if quantize and lora_targets and form == "openpi":
        raise ValueError(
            f"quantize={quantize!r} with form='openpi': openpi's LoRA form adapts float "
            "kernels; use form='keras' for quantized bases."
        )
    if quantize and not (lora_targets or frozen_groups):
        raise ValueError(
            f"quantize={quantize!r} quantizes frozen weights, and strategy {strategy!r} freezes none."
        )

    unfreeze_all(model)
    if quantize:
        quantize_layers(model, group_layers(model, lora_targets + frozen_groups), quantize)
    if keep_adapters:
        freeze_lora_targets(model, lora_config)
    else:
        add_adapters(model, lora_config)
    freeze(model, patterns=freeze_patterns, groups=frozen_groups)
    if frozen_dtype:
        cast_frozen(model, frozen_dtype)
    set_remat(model, remat)
    state.strategy = strategy
    state.lora = lora_config
    state.frozen_dtype = frozen_dtype
    state.remat = bool(remat)
    model.reset_train_functions()
    return spec


def _check_kept_adapters(model, strategy, lora_config, quantize):
    """Raises unless the adapters `model` has are exactly those `strategy` would add."""
    current = {k: dict(v) for k, v in model.finetuning_state.lora.items()}
    if current != lora_config:
        raise ValueError(
            f"{model.name!r} already has LoRA adapters {json.dumps(current)}; strategy {strategy!r} "
            f"asks for {json.dumps(lora_config)}. A strategy keeps a model's adapters only "
            "when it asks for exactly them (targets, rank, alpha, form); otherwise call "
            "merge_lora() first, or rebuild the model."
        )
    if quantize:
        raise ValueError(
            f"quantize={quantize!r} quantizes the bases of new adapters; {model.name!r} has "
            "its adapters already (merge_lora() first)."
        )


def _model_lora_targets(model, spec, frozen_groups):
    """The groups the strategy adapts on `model`; an error when the model lacks one of
    them or when the strategy would freeze all of the model."""
    declared = declared_groups(model)
    if spec.lora_targets == DEFAULT_LORA_TARGETS:
        targets = default_lora_targets(model)
    else:
        targets = tuple(spec.lora_targets)
    missing = [t for t in targets + tuple(frozen_groups) if t not in declared]
    if missing:
        kind = "adapts" if set(missing) & set(targets) else "freezes"
        raise ValueError(
            f"Strategy {spec.name!r} {kind} {missing}, which {type(model).__name__} "
            f"does not have (its groups: {sorted(declared)})."
        )
    if not targets and set(declared) <= set(frozen_groups):
        raise ValueError(
            f"Strategy {spec.name!r} freezes {list(frozen_groups)}: every weight of "
            f"{type(model).__name__} (its groups: {sorted(declared)})."
        )
    return targets


def available_strategies(model):
    """The names of the `STRATEGIES` that apply to `model` (its groups have what they adapt and freeze).

    Example:
    >>> available_strategies(pi0_fast)  # doctest: +SKIP
    ['frozen_vision', 'full', 'lora', 'lora_vlm']
    """
    names = []
    for name, spec in STRATEGIES.items():
        try:
            _model_lora_targets(model, spec, spec.frozen_groups)
        except ValueError:
            continue
        names.append(name)
    return sorted(names)
