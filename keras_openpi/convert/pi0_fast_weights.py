"""The map between openpi's π0-FAST parameters and `keras_openpi.models.Pi0Fast`."""

from keras_openpi.convert.lora_merge import merge_openpi_lora
from keras_openpi.convert.pi0_weights import LLM
from keras_openpi.convert.pi0_weights import _shape
from keras_openpi.convert.pi0_weights import assign_openpi_weights
from keras_openpi.convert.pi0_weights import gemma_config_from_params
from keras_openpi.convert.pi0_weights import gemma_weight_map
from keras_openpi.convert.pi0_weights import vision_config_from_params
from keras_openpi.convert.pi0_weights import vision_weight_map

# `(openpi suffix, Keras expert)` of π0-FAST's single Gemma.
PI0_FAST_EXPERTS = (("", "vlm"),)


def openpi_model_type(params):
    """`pi0_fast`, `pi05` or `pi0`, from which parameters an openpi checkpoint holds.

    π0-FAST has one Gemma (no `_1` expert) and no action projections; π0.5
    has `time_mlp_in`; π0 has `state_proj`.
    """
    if "action_in_proj/kernel" not in params and not any(
        k.startswith(f"{LLM}/layers/attn/q_einsum_1") for k in params
    ):
        return "pi0_fast"
    return "pi05" if "time_mlp_in/kernel" in params else "pi0"


def pi0_fast_config_from_params(params):
    """Infers `Pi0Fast` architecture arguments from openpi parameter shapes.

    Returns:
        dict with `paligemma_variant` (a dimension dict), `vision_variant`,
        `vocabulary_size` and `image_resolution`. The action width and
        horizon are not in the weights.
    """
    params = merge_openpi_lora(params)
    vision, resolution = vision_config_from_params(params)
    return dict(
        paligemma_variant=gemma_config_from_params(params, ""),
        vision_variant=vision,
        vocabulary_size=_shape(params, f"{LLM}/embedder/input_embedding")[0],
        image_resolution=resolution,
    )


def pi0_fast_weight_map(model):
    """`(openpi_path, keras_path, select)` for every `Pi0Fast` weight.

    openpi's π0-FAST Gemma has π0's expert-0 parameter names
    (`PaliGemma/llm/layers/attn/q_einsum/w`, ...), its SigLIP π0's.
    """
    return gemma_weight_map(model.gemma, PI0_FAST_EXPERTS) + vision_weight_map(model.vision_encoder)


def load_pi0_fast_weights(model, params, lora_scale=1.0):
    """Assigns openpi π0-FAST parameters to a `Pi0Fast`, after checking all of them.

    openpi LoRA adapters (`gemma_2b_lora`) are merged into their base weights
    first, unless the model has adapters, which then take them unmerged (see
    `assign_openpi_weights`). A missing or misshapen weight raises a `ValueError` naming the
    openpi path and the shapes, and leaves the model unchanged.

    Raises:
        ValueError: a weight missing, misshapen, or in the checkpoint but unused.
    """
    assign_openpi_weights(model, params, pi0_fast_weight_map(model), lora_scale)
