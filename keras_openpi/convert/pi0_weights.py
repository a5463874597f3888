"""The map between openpi's π0 / π0.5 parameters and `keras_openpi.models.Pi0`."""

import numpy as np

from keras_openpi.convert.lora_merge import merge_openpi_lora
from keras_openpi.convert.openpi_lora import lora_weight_map

LLM = "PaliGemma/llm"
IMG = "PaliGemma/img"
BLOCK = f"{IMG}/Transformer/encoderblock"
# `(openpi suffix, Keras expert)` of π0's two Gemma experts; expert 0 owns the token embedding.
PI0_EXPERTS = (("", "vlm"), ("_1", "action_expert"))


def _shape(params, key):
    if key not in params:
        raise ValueError(f"The openpi checkpoint has no weight {key!r}.")
    return params[key].shape


def _whole(array):
    return array


def gemma_config_from_params(params, suffix=""):
    """The Gemma dimensions (`GEMMA_KEYS` dict) of openpi's expert `suffix` ("" or "_1")."""
    depth, num_heads, width, head_dim = _shape(params, f"{LLM}/layers/attn/q_einsum{suffix}/w")
    num_kv_heads = _shape(params, f"{LLM}/layers/attn/kv_einsum{suffix}/w")[2]
    mlp_dim = _shape(params, f"{LLM}/layers/mlp{suffix}/linear")[1]
    return dict(
        width=width,
        depth=depth,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )


def vision_config_from_params(params):
    """`vision_variant` (`SIGLIP_KEYS` dict) and `image_resolution` of openpi's SigLIP."""
    patch, _, _, vision_width = _shape(params, f"{IMG}/embedding/kernel")
    num_patches = _shape(params, f"{IMG}/pos_embedding")[1]
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(
            f"openpi's {IMG}/pos_embedding has {num_patches} positions; only square "
            "images are supported."
        )
    vision = dict(
        width=vision_width,
        depth=_shape(params, f"{BLOCK}/LayerNorm_0/scale")[0],
        mlp_dim=_shape(params, f"{BLOCK}/MlpBlock_0/Dense_0/kernel")[-1],
        num_heads=_shape(params, f"{BLOCK}/MultiHeadDotProductAttention_0/query/kernel")[2],
        patch_size=patch,
    )
    return vision, (side * patch, side * patch)


def pi0_config_from_params(params):
    """Infers `Pi0` architecture arguments from openpi parameter shapes.

    Returns:
        dict with `paligemma_variant`, `action_expert_variant` (dimension dicts),
        `vision_variant`, `vocabulary_size`, `action_dim`, `pi05` and
        `image_resolution`.
    """
    params = merge_openpi_lora(params)
    vision, resolution = vision_config_from_params(params)
    return dict(
        paligemma_variant=gemma_config_from_params(params, ""),
        action_expert_variant=gemma_config_from_params(params, "_1"),
        vision_variant=vision,
        vocabulary_size=_shape(params, f"{LLM}/embedder/input_embedding")[0],
        action_dim=_shape(params, "action_in_proj/kernel")[0],
        pi05="time_mlp_in/kernel" in params,
        image_resolution=resolution,
    )


def _norm_entries(openpi_norm, keras_norm, stacked_index=None):
    """RMS norm: `scale`, or adaRMS `Dense_0/{kernel,bias}` -> `modulation`."""
    pick = (lambda a: a) if stacked_index is None else (lambda a: a[stacked_index])
    return [
        (f"{openpi_norm}/scale", f"{keras_norm}/scale", pick),
        (f"{openpi_norm}/Dense_0/kernel", f"{keras_norm}/modulation/kernel", pick),
        (f"{openpi_norm}/Dense_0/bias", f"{keras_norm}/modulation/bias", pick),
    ]


def gemma_weight_map(gemma, experts):
    """`(openpi_path, keras_path, select)` entries of a `GemmaMixture` named `gemma`.

    Args:
        gemma: the model's `GemmaMixture`.
        experts: `(openpi suffix, Keras expert name)` pairs, e.g.
            `[("", "vlm"), ("_1", "action_expert")]`; expert 0 owns the
            token embedding.
    """
    entries = []
    for i in range(gemma.depth):
        at = lambda i=i: (lambda a: a[i])  # noqa: E731
        for suffix, expert in experts:
            block = f"gemma/decoder_block_{i}/{expert}"
            attn = f"{LLM}/layers/attn"
            mlp = f"{LLM}/layers/mlp{suffix}"
            entries += [
                (f"{attn}/q_einsum{suffix}/w", f"{block}/attention/query/kernel", at()),
                (
                    f"{attn}/kv_einsum{suffix}/w",
                    f"{block}/attention/key/kernel",
                    lambda a, i=i: a[i, 0],
                ),
                (
                    f"{attn}/kv_einsum{suffix}/w",
                    f"{block}/attention/value/kernel",
                    lambda a, i=i: a[i, 1],
                ),
                (f"{attn}/attn_vec_einsum{suffix}/w", f"{block}/attention/output/kernel", at()),
                (f"{mlp}/gating_einsum", f"{block}/feed_forward/gate/kernel", lambda a, i=i: a[i, 0]),
                (f"{mlp}/gating_einsum", f"{block}/feed_forward/up/kernel", lambda a, i=i: a[i, 1]),
                (f"{mlp}/linear", f"{block}/feed_forward/down/kernel", at()),
            ]
            entries += _norm_entries(
                f"{LLM}/layers/pre_attention_norm{suffix}", f"{block}/pre_attention_norm", i
            )
            entries += _norm_entries(
                f"{LLM}/layers/pre_ffw_norm{suffix}", f"{block}/pre_feed_forward_norm", i
            )
    for suffix, expert in experts:
        entries += _norm_entries(f"{LLM}/final_norm{suffix}", f"gemma/{expert}_final_norm")
    entries.append((f"{LLM}/embedder/input_embedding", "gemma/token_embedding/embeddings", _whole))
    return entries


def vision_weight_map(encoder):
    """`(openpi_path, keras_path, select)` entries of a `SigLIPEncoder` named `vision_encoder`."""
    vision = "vision_encoder"
    entries = [
        (f"{IMG}/embedding/kernel", f"{vision}/patch_embedding/kernel", _whole),
        (f"{IMG}/embedding/bias", f"{vision}/patch_embedding/bias", _whole),
        (f"{IMG}/pos_embedding", f"{vision}/position_embedding", _whole),
        (f"{IMG}/Transformer/encoder_norm/scale", f"{vision}/encoder_norm/gamma", _whole),
        (f"{IMG}/Transformer/encoder_norm/bias", f"{vision}/encoder_norm/beta", _whole),
        (f"{IMG}/head/kernel", f"{vision}/head/kernel", _whole),
        (f"{IMG}/head/bias", f"{vision}/head/bias", _whole),
    ]
    vision_parts = {
        "LayerNorm_0/scale": "attention_norm/gamma",
        "LayerNorm_0/bias": "attention_norm/beta",
        "LayerNorm_1/scale": "mlp_norm/gamma",
        "LayerNorm_1/bias": "mlp_norm/beta",
        "MlpBlock_0/Dense_0/kernel": "mlp_in/kernel",
        "MlpBlock_0/Dense_0/bias": "mlp_in/bias",
        "MlpBlock_0/Dense_1/kernel": "mlp_out/kernel",
        "MlpBlock_0/Dense_1/bias": "mlp_out/bias",
    }
    for name in ("query", "key", "value"):
        for kind in ("kernel", "bias"):
            vision_parts[f"MultiHeadDotProductAttention_0/{name}/{kind}"] = (
                f"attention/{name}/{kind}"
            )
    for kind in ("kernel", "bias"):
        vision_parts[f"MultiHeadDotProductAttention_0/out/{kind}"] = (
            f"attention/attention_output/{kind}"
        )
    for j in range(encoder.depth):
        for openpi_part, keras_part in vision_parts.items():
            entries.append(
                (
                    f"{BLOCK}/{openpi_part}",
                    f"{vision}/encoder_block_{j}/{keras_part}",
                    lambda a, j=j: a[j],
                )
            )
    return entries


def pi0_weight_map(model):
    """Yields `(openpi_path, keras_path, select)` for every `Pi0` weight.

    `select(openpi_array)` returns the part of the openpi array that is the
    Keras weight (one layer of a depth-stacked array, one of the stacked
    key/value or gate/up matrices). Keras paths omit the model's own name.
    adaRMS entries appear for both forms; only those the model has are used.
    """
    entries = gemma_weight_map(model.gemma, PI0_EXPERTS)
    entries += vision_weight_map(model.vision_encoder)

    projections = ["action_in_proj", "action_out_proj"]
    projections += (
        ["time_mlp_in", "time_mlp_out"]
        if model.pi05
        else ["state_proj", "action_time_mlp_in", "action_time_mlp_out"]
    )
    for name in projections:
        for kind in ("kernel", "bias"):
            entries.append((f"{name}/{kind}", f"{name}/{kind}", _whole))
    return entries


def _keras_variables(model):
    prefix = model.name + "/"
    return {
        v.path[len(prefix) :] if v.path.startswith(prefix) else v.path: v
        for v in model.weights
    }


def load_pi0_weights(model, params, lora_scale=1.0):
    """Assigns openpi parameters to a `Pi0` model, after checking all of them.

    openpi LoRA adapters in `params` are merged into their base weights
    first, unless the model has LoRA adapters (openpi's form, e.g. from
    `enable_lora(..., form="openpi")`): those then take the checkpoint's
    `lora_a` / `lora_b` arrays as they are. Every model weight must be found
    with the right shape; otherwise a `ValueError` names the openpi path and
    both shapes, and the model is left unchanged.

    Args:
        model: a built `keras_openpi.models.Pi0`.
        params: flat openpi parameter dict (see `load_openpi_params`).
        lora_scale: openpi's LoRA `alpha / rank`, for a merge.

    Raises:
        ValueError: a weight missing, misshapen, or in the checkpoint but unused.
    """
    assign_openpi_weights(model, params, pi0_weight_map(model), lora_scale)


def assign_openpi_weights(model, params, entries, lora_scale=1.0):
    """Assigns openpi parameters to `model` through a weight map, after checking all of them.

    A model with LoRA adapters takes the checkpoint's adapters unmerged
    (`lora_weight_map` extends `entries`); a model without merges them
    (`merge_openpi_lora`).

    Args:
        model: a built model.
        params: flat openpi parameter dict (see `load_openpi_params`).
        entries: `(openpi_path, keras_path, select)` for every model weight
            (entries naming weights the model lacks are skipped).
        lora_scale: openpi's LoRA `alpha / rank`, for a merge.

    Raises:
        ValueError: an openpi weight missing or misshapen for the model, a
            model weight no entry fills, or a checkpoint weight no entry
            uses (another model's checkpoint); the model is then unchanged.
    """
    variables = _keras_variables(model)
    if any(v.name.startswith("lora_kernel") for v in variables.values()):
        entries = list(entries) + lora_weight_map(entries)
    else:
        params = merge_openpi_lora(params, lora_scale)
    values, used = {}, set()
    for openpi_path, keras_path, select in entries:
        if keras_path not in variables:
            continue  # the other norm form (adaRMS vs plain)
        variable = variables[keras_path]
        if openpi_path not in params:
            raise ValueError(
                f"The openpi checkpoint has no weight {openpi_path!r}, needed for "
                f"{keras_path!r} with shape {tuple(variable.shape)}."
            )
        try:
            value = select(params[openpi_path])
        except IndexError:
            value = None
        if value is None or tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"openpi weight {openpi_path!r} has shape "
                f"{tuple(params[openpi_path].shape)}, which does not give "
                f"{keras_path!r} its shape {tuple(variable.shape)} "
                f"(got {None if value is None else tuple(value.shape)})."
            )
        values[keras_path] = value
        used.add(openpi_path)
    missing = sorted(set(variables) - set(values) - {"seed_generator/seed_generator_state"})
    missing = [m for m in missing if "seed_generator" not in m]
    if missing:
        raise ValueError(f"No openpi weight maps to the model weights {missing}.")
    unused = sorted(set(params) - used)
    if unused:
        shown = ", ".join(repr(u) for u in unused[:5]) + (", ..." if len(unused) > 5 else "")
        raise ValueError(
            f"the openpi checkpoint has {len(unused)} weights that a {type(model).__name__} of "
            f"this architecture does not use: {shown}. It is most likely another model's "
            "checkpoint (or a variant this version does not know); nothing was loaded."
        )
    for keras_path, value in values.items():
        variables[keras_path].assign(np.asarray(value, dtype=variables[keras_path].dtype))
