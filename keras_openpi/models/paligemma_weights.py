"""π0's VLM and vision tower from a keras-hub `PaliGemmaBackbone`, as openpi initializes π0.

`Pi0.from_paligemma(backbone)` and `Pi0Fast.from_paligemma(backbone)` call
`policy_from_paligemma` (`keras_openpi.convert` re-exports these functions).

openpi builds π0 (and π0.5, π0-FAST) from PaliGemma-3B: the SigLIP tower, the
Gemma token embedding, decoder blocks and final norm are PaliGemma's; the
action expert and the action/state/time projections start fresh. keras-hub's
`PaliGemmaBackbone` computes the same functions with the same weights, laid
out differently:

- SigLIP attention: keras-hub's query/key/value/output projections are
  `Dense` layers of (D, N * H) (output (N * H, D)); π0's are Keras
  `MultiHeadAttention` kernels of (D, N, H) (output (N, H, D)), the head
  axis split out of the same columns.
- Position embedding: keras-hub's `Embedding` table (P, D); π0's (1, P, D).
- Everything else is the same array: the patch convolution, layer norms
  (`gamma`/`beta`), MLPs, the `image_classifier` (π0's `head`), the Gemma
  einsum kernels (query (N, D, H), key/value (K, D, H), output (N, H, D)),
  the gated feed-forward (`ffw_gating` → `gate`, `ffw_gating_2` → `up`,
  `ffw_linear` → `down`; keras-hub's `intermediate_dim` is twice π0's
  `mlp_dim`), the RMS norm scales and the token embedding.
  keras-hub's Gemma rotary embedding interleaves the two rotated halves of
  queries and keys alike, which leaves every attention logit unchanged, so
  the query and key kernels copy as they are.

The model is reached through its public layer attributes: `vision_encoder`
(a `SigLIPEncoder`: `patch_embedding`, `position_embedding`, `blocks[i]`
with `attention_norm`, `attention` (its `query_dense`, `key_dense`,
`value_dense`, `output_dense`), `mlp_norm`, `mlp_in`, `mlp_out`;
`encoder_norm`, `head`) and `gemma` (a `GemmaMixture`: `token_embedding`,
`decoder_blocks[i].experts[0]` with `pre_attention_norm`, `attention`
(`query`, `key`, `value`, `output_projection`), `pre_feed_forward_norm`,
`feed_forward` (`gate`, `up`, `down`); `final_norms[0]`).
"""

import os

import numpy as np

from keras_openpi.layers.rms_norm import EPSILON as RMS_NORM_EPSILON

# `PaliGemmaBackbone` options π0's layers do not have (PaliGemma 2's Gemma 2
# features among them), with the value π0 computes.
UNSUPPORTED_OPTIONS = {
    "vit_pooling": None,
    "vit_classifier_activation": None,
    "query_head_dim_normalize": True,
    "use_post_ffw_norm": False,
    "use_post_attention_norm": False,
    "attention_logit_soft_cap": None,
    "final_logit_soft_cap": None,
    "use_sliding_window_attention": False,
    "layer_norm_epsilon": RMS_NORM_EPSILON,
}


def check_paligemma_backbone(backbone):
    """Raises a `ValueError` when `backbone` computes something π0's VLM cannot.

    Args:
        backbone: a `keras_hub.models.PaliGemmaBackbone`.
    """
    if not all(hasattr(backbone, a) for a in ("vit_encoder", "transformer_layers")):
        raise ValueError(
            "'backbone' must be a keras_hub.models.PaliGemmaBackbone, got "
            f"{type(backbone).__name__}."
        )
    for option, supported in UNSUPPORTED_OPTIONS.items():
        value = getattr(backbone, option)
        if option == "vit_classifier_activation" and value == "linear":
            value = None
        if value != supported:
            raise ValueError(
                f"the PaliGemmaBackbone has {option}={value!r}; π0's VLM computes "
                f"{option}={supported!r} (PaliGemma 1's architecture) and cannot take its weights."
            )


def pi0_config_from_paligemma(backbone):
    """The `Pi0` / `Pi0Fast` arguments that give a VLM and vision tower of `backbone`'s shape.

    Args:
        backbone: a `keras_hub.models.PaliGemmaBackbone`.

    Returns:
        dict with `paligemma_variant` and `vision_variant` (dimension dicts),
        `vocabulary_size` and `image_resolution`.
    """
    check_paligemma_backbone(backbone)
    return dict(
        paligemma_variant=dict(
            width=backbone.hidden_dim,
            depth=backbone.num_layers,
            # keras-hub counts both halves of the gated feed-forward.
            mlp_dim=backbone.intermediate_dim // 2,
            num_heads=backbone.num_query_heads,
            num_kv_heads=backbone.num_key_value_heads,
            head_dim=backbone.head_dim,
        ),
        vision_variant=dict(
            width=backbone.vit_hidden_dim,
            depth=backbone.vit_num_layers,
            mlp_dim=backbone.vit_intermediate_dim,
            num_heads=backbone.vit_num_heads,
            patch_size=backbone.vit_patch_size,
        ),
        vocabulary_size=backbone.vocabulary_size,
        image_resolution=(backbone.image_size, backbone.image_size),
    )


def _same(array):
    return array


def _split_heads(num_heads, axis):
    """(D, N * H) -> (D, N, H) (axis 1), (N * H, D) -> (N, H, D) (axis 0), (N * H,) -> (N, H)."""

    def split(array):
        shape = list(array.shape)
        shape[axis : axis + 1] = [num_heads, shape[axis] // num_heads]
        return array.reshape(shape)

    return split


def vision_weight_pairs(vit, encoder):
    """`(name, source, target, transform)` for every weight of π0's SigLIP encoder.

    Args:
        vit: the backbone's `PaliGemmaVit` (`backbone.vit_encoder`).
        encoder: the model's `SigLIPEncoder` (`model.vision_encoder`).
    """
    tower = vit.get_layer("image_encoder")
    embeddings = tower.vision_embeddings
    head = vit.get_layer("image_classifier")
    if len(tower.resblocks) != len(encoder.blocks):
        raise ValueError(
            f"the PaliGemmaVit has {len(tower.resblocks)} blocks; the model's vision "
            f"encoder has {len(encoder.blocks)}."
        )
    if tower.num_heads != encoder.num_heads:
        raise ValueError(
            f"the PaliGemmaVit has {tower.num_heads} heads; the model's vision encoder "
            f"has {encoder.num_heads}."
        )
    pairs = [
        ("embedding/kernel", embeddings.patch_embedding.kernel,
         encoder.patch_embedding.kernel, _same),
        ("embedding/bias", embeddings.patch_embedding.bias,
         encoder.patch_embedding.bias, _same),
        ("position_embedding", embeddings.position_embedding.embeddings,
         encoder.position_embedding, lambda a: a[None]),
        ("encoder_layer_norm/gamma", tower.encoder_layer_norm.gamma,
         encoder.encoder_norm.gamma, _same),
        ("encoder_layer_norm/beta", tower.encoder_layer_norm.beta,
         encoder.encoder_norm.beta, _same),
        ("image_classifier/kernel", head.kernel, encoder.head.kernel, _same),
        ("image_classifier/bias", head.bias, encoder.head.bias, _same),
    ]  # fmt: skip
    heads = encoder.num_heads
    for i, (source, target) in enumerate(zip(tower.resblocks, encoder.blocks)):
        attention = target.attention
        projections = [
            (source.attn.query_proj, attention.query_dense),
            (source.attn.key_proj, attention.key_dense),
            (source.attn.value_proj, attention.value_dense),
        ]
        for name, (hub, ours) in zip(("query", "key", "value"), projections):
            pairs.append(
                (f"block_{i}/{name}/kernel", hub.kernel, ours.kernel, _split_heads(heads, 1))
            )
            pairs.append((f"block_{i}/{name}/bias", hub.bias, ours.bias, _split_heads(heads, 0)))
        out = attention.output_dense
        pairs += [
            (
                f"block_{i}/out/kernel",
                source.attn.out_proj.kernel,
                out.kernel,
                _split_heads(heads, 0),
            ),
            (f"block_{i}/out/bias", source.attn.out_proj.bias, out.bias, _same),
        ]
        for hub, ours in (
            (source.layer_norm_1, target.attention_norm),
            (source.layer_norm_2, target.mlp_norm),
        ):
            pairs.append((f"block_{i}/{hub.name}/gamma", hub.gamma, ours.gamma, _same))
            pairs.append((f"block_{i}/{hub.name}/beta", hub.beta, ours.beta, _same))
        for hub, ours in (
            (source.mlp_dense_1, target.mlp_in),
            (source.mlp_dense_2, target.mlp_out),
        ):
            pairs.append((f"block_{i}/{hub.name}/kernel", hub.kernel, ours.kernel, _same))
            pairs.append((f"block_{i}/{hub.name}/bias", hub.bias, ours.bias, _same))
    return [(f"vit/{name}", *rest) for name, *rest in pairs]


def language_weight_pairs(backbone, gemma):
    """`(name, source, target, transform)` for the Gemma weights of π0's VLM expert (expert 0).

    Args:
        backbone: a `keras_hub.models.PaliGemmaBackbone`.
        gemma: the model's `GemmaMixture` (`model.gemma`).
    """
    if len(backbone.transformer_layers) != len(gemma.decoder_blocks):
        raise ValueError(
            f"the PaliGemmaBackbone has {len(backbone.transformer_layers)} decoder blocks; "
            f"the model's Gemma has {len(gemma.decoder_blocks)}."
        )
    pairs = [
        ("token_embedding", backbone.token_embedding.embeddings,
         gemma.token_embedding.embeddings),
        ("final_normalization/scale", backbone.layer_norm.scale, gemma.final_norms[0].scale),
    ]  # fmt: skip
    for i, (source, block) in enumerate(zip(backbone.transformer_layers, gemma.decoder_blocks)):
        target = block.experts[0]
        pairs += [
            (f"decoder_block_{i}/pre_attention_norm/scale", source.pre_attention_norm.scale,
             target.pre_attention_norm.scale),
            (f"decoder_block_{i}/attention/query", source.attention.query_dense.kernel,
             target.attention.query.kernel),
            (f"decoder_block_{i}/attention/key", source.attention.key_dense.kernel,
             target.attention.key.kernel),
            (f"decoder_block_{i}/attention/value", source.attention.value_dense.kernel,
             target.attention.value.kernel),
            (f"decoder_block_{i}/attention/attention_output", source.attention.output_dense.kernel,
             target.attention.output_projection.kernel),
            (f"decoder_block_{i}/pre_ffw_norm/scale", source.pre_ffw_norm.scale,
             target.pre_feed_forward_norm.scale),
            (f"decoder_block_{i}/ffw_gating", source.gating_ffw.kernel,
             target.feed_forward.gate.kernel),
            (f"decoder_block_{i}/ffw_gating_2", source.gating_ffw_2.kernel,
             target.feed_forward.up.kernel),
            (f"decoder_block_{i}/ffw_linear", source.ffw_linear.kernel,
             target.feed_forward.down.kernel),
        ]  # fmt: skip
    return [(f"gemma/{name}", source, target, _same) for name, source, target in pairs]


def load_paligemma_weights(model, backbone):
    """Copies a keras-hub PaliGemma's weights into a model's VLM expert and vision tower.

    The action expert and the projections are not touched (they stay as
    initialized, as openpi's π0 starts from PaliGemma). Every pair is checked
    before anything is assigned: on an error the model is unchanged.

    Args:
        model: a built `Pi0` or `Pi0Fast` (anything with a `SigLIPEncoder`
            `vision_encoder` and a `GemmaMixture` `gemma` whose expert 0 is
            the VLM), of the backbone's shape (`pi0_config_from_paligemma`).
        backbone: a `keras_hub.models.PaliGemmaBackbone` (PaliGemma 1).

    Raises:
        ValueError: the backbone has options π0 does not compute, or a
            weight's shape differs (naming the weight and both shapes).
    """
    check_paligemma_backbone(backbone)
    pairs = vision_weight_pairs(backbone.vit_encoder, model.vision_encoder)
    pairs += language_weight_pairs(backbone, model.gemma)
    values = []
    for name, source, target, transform in pairs:
        value = transform(np.asarray(source))
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"PaliGemma weight {name} has shape {tuple(source.shape)}, but π0's "
                f"{target.path} has shape {tuple(target.shape)}; build the model with "
                "pi0_config_from_paligemma(backbone)."
            )
        values.append((target, value))
    for target, value in values:
        target.assign(value.astype(target.dtype))


_FUNCTIONS = {"Pi0": "Pi0.from_paligemma", "Pi0Fast": "Pi0Fast.from_paligemma"}


def policy_from_paligemma(model_class, backbone, **kwargs):
    """A policy whose VLM and vision tower are a keras-hub PaliGemma's, as openpi starts π0.

    Args:
        model_class: `keras_openpi.models.Pi0` or `Pi0Fast`.
        backbone: a `keras_hub.models.PaliGemmaBackbone`, or a preset to load
            one from (`keras_hub.models.PaliGemmaBackbone.from_preset`: a local
            directory, `kaggle://`, `hf://`, or a keras-hub name such as
            `pali_gemma_3b_224`, which downloads), loaded in Keras' default dtype.
        **kwargs: more `model_class` arguments (`action_dim`, `action_horizon`,
            `dtype`, ...; π0: `action_expert_variant`, `pi05`); not the ones
            the backbone fixes (`pi0_config_from_paligemma`).

    Returns:
        a `model_class` instance with the backbone's VLM and vision weights and,
        for π0, a freshly initialized action expert and projections.

    Raises:
        ValueError: an argument the backbone fixes, a backbone option π0
            does not compute, or a weight of another shape.
    """
    if isinstance(backbone, (str, os.PathLike)):
        import keras_hub

        backbone = keras_hub.models.PaliGemmaBackbone.from_preset(os.fspath(backbone))
    config = pi0_config_from_paligemma(backbone)
    fixed = sorted(set(config) & set(kwargs))
    if fixed:
        raise ValueError(
            f"{fixed} come from the PaliGemma backbone; do not pass them to "
            f"{_FUNCTIONS[model_class.__name__]}."
        )
    model = model_class(**config, **kwargs)
    load_paligemma_weights(model, backbone)
    return model


def pi0_from_paligemma(backbone, action_expert_variant="gemma_300m", **kwargs):
    """A `Pi0` (π0 or, with `pi05=True`, π0.5) started from a keras-hub PaliGemma.

    See `policy_from_paligemma`. The action expert
    (openpi: `gemma_300m`) must have the backbone's depth, heads and head dim.
    """
    from keras_openpi.models.pi0 import Pi0

    return policy_from_paligemma(
        Pi0, backbone, action_expert_variant=action_expert_variant, **kwargs
    )


def pi0_fast_from_paligemma(backbone, **kwargs):
    """A `Pi0Fast` started from a keras-hub PaliGemma (π0-FAST is PaliGemma itself).

    See `policy_from_paligemma`. Every weight is
    the PaliGemma's.
    """
    from keras_openpi.models.pi0_fast import Pi0Fast

    return policy_from_paligemma(Pi0Fast, backbone, **kwargs)
