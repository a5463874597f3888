"""Importing openpi, LeRobot and keras-hub PaliGemma weights; exporting openpi and LeRobot ones."""

import math
import numbers

from keras_openpi.convert.lerobot_checkpoint import export_lerobot
from keras_openpi.convert.lerobot_checkpoint import pi0_from_lerobot
from keras_openpi.convert.openpi_export import export_openpi
from keras_openpi.convert.openpi_export import to_openpi_params
from keras_openpi.convert.openpi_lora import openpi_lora_config
from keras_openpi.convert.openpi_params import load_openpi_params
from keras_openpi.models.paligemma_weights import load_paligemma_weights
from keras_openpi.models.paligemma_weights import pi0_config_from_paligemma
from keras_openpi.models.paligemma_weights import pi0_fast_from_paligemma
from keras_openpi.models.paligemma_weights import pi0_from_paligemma
from keras_openpi.models.paligemma_weights import policy_from_paligemma
from keras_openpi.convert.pi0_fast_weights import PI0_FAST_EXPERTS
from keras_openpi.convert.pi0_fast_weights import load_pi0_fast_weights
from keras_openpi.convert.pi0_fast_weights import openpi_model_type
from keras_openpi.convert.pi0_fast_weights import pi0_fast_config_from_params
from keras_openpi.convert.pi0_weights import PI0_EXPERTS
from keras_openpi.convert.pi0_weights import load_pi0_weights
from keras_openpi.convert.pi0_weights import pi0_config_from_params


def pi0_from_openpi(
    source,
    action_horizon,
    max_token_len=None,
    model="pi0",
    lora_scale=1.0,
    keep_lora=False,
    **kwargs,
):
    """Builds a `Pi0` from an openpi checkpoint, inferring its architecture.

    Args:
        source: an openpi orbax `params/` directory or an `.npz` of flat
            openpi paths (see `load_openpi_params`).
        action_horizon: H; not stored in openpi checkpoints.
        max_token_len: prompt length; defaults to 48 (π0) / 200 (π0.5).
        model: `"pi0"` or `"pi05"`; must agree with the checkpoint.
        lora_scale: openpi's LoRA `alpha / rank`, for checkpoints with adapters
            (they are merged into the base weights).
        keep_lora: keep the checkpoint's LoRA adapters unmerged, in openpi's
            form (see `kept_openpi_lora`).
        **kwargs: more `Pi0` arguments (e.g. `dtype`, `image_keys`).

    Returns:
        a `keras_openpi.models.Pi0` holding the checkpoint's weights.
    """
    from keras_openpi.models import Pi0

    if model not in ("pi0", "pi05"):
        raise ValueError(f"model must be 'pi0' or 'pi05', got {model!r}.")
    check_settings(
        action_horizon=action_horizon, max_token_len=max_token_len, lora_scale=lora_scale
    )
    params = load_openpi_params(source)
    _check_model_type(params, model, source)
    lora = kept_openpi_lora(params, PI0_EXPERTS, lora_scale, source) if keep_lora else {}
    config = pi0_config_from_params(params)
    policy = Pi0(
        **config, action_horizon=action_horizon, max_token_len=max_token_len, **kwargs
    )
    _enable_openpi_lora(policy, lora)
    load_pi0_weights(policy, params, lora_scale=lora_scale)
    return policy


def pi0_fast_from_openpi(
    source,
    action_dim,
    action_horizon,
    max_token_len=250,
    lora_scale=1.0,
    keep_lora=False,
    **kwargs,
):
    """Builds a `Pi0Fast` from an openpi π0-FAST checkpoint, inferring its architecture.

    Args:
        source: an openpi orbax `params/` directory or an `.npz` of flat
            openpi paths (see `load_openpi_params`).
        action_dim: D of the decoded chunks (openpi: `Pi0FASTConfig.action_dim`,
            e.g. 8 for DROID, 7 for LIBERO); not stored in the checkpoint.
        action_horizon: H of the decoded chunks; not stored either.
        max_token_len: token sequence length L (openpi's default 250).
        lora_scale: openpi's LoRA `alpha / rank`, for checkpoints with adapters
            (they are merged into the base weights).
        keep_lora: keep the checkpoint's LoRA adapters unmerged, in openpi's
            form (see `kept_openpi_lora`).
        **kwargs: more `Pi0Fast` arguments (e.g. `dtype`, `image_keys`).

    Returns:
        a `keras_openpi.models.Pi0Fast` holding the checkpoint's weights.
    """
    from keras_openpi.models import Pi0Fast

    check_settings(
        action_dim=action_dim,
        action_horizon=action_horizon,
        max_token_len=max_token_len,
        lora_scale=lora_scale,
    )
    params = load_openpi_params(source)
    _check_model_type(params, "pi0_fast", source)
    lora = kept_openpi_lora(params, PI0_FAST_EXPERTS, lora_scale, source) if keep_lora else {}
    policy = Pi0Fast(
        **pi0_fast_config_from_params(params),
        action_dim=action_dim,
        action_horizon=action_horizon,
        max_token_len=max_token_len,
        **kwargs,
    )
    _enable_openpi_lora(policy, lora)
    load_pi0_fast_weights(policy, params, lora_scale=lora_scale)
    return policy


def kept_openpi_lora(params, experts, lora_scale, source):
    """The openpi-form LoRA configuration that keeps a checkpoint's adapters (`keep_lora`).

    The adapted experts and their ranks are read from the `lora_a` / `lora_b`
    arrays (openpi stores no alpha: alpha = `lora_scale` * rank, 1 * rank
    for openpi's configs). A model given these adapters is frozen as openpi's
    `*_lora` configuration (every weight of an adapted expert but its
    adapters), and loading the checkpoint assigns the adapters as they are.

    Raises:
        ValueError: the checkpoint has no LoRA weights, or adapts an expert
            in part or with several ranks.
    """
    config = openpi_lora_config(params, experts, lora_scale)
    if not config:
        raise ValueError(
            f"--keep-lora: the openpi checkpoint {str(source)!r} has no LoRA weights "
            "(no lora_a / lora_b arrays); convert it without --keep-lora."
        )
    return config


def _enable_openpi_lora(model, config):
    if not config:
        return
    model.enable_lora(
        rank={group: spec["rank"] for group, spec in config.items()},
        alpha={group: spec["alpha"] for group, spec in config.items()},
        targets=tuple(config),
        form="openpi",
    )


def check_settings(flags=False, **settings):
    """Raises a `ValueError` for a setting the checkpoint cannot be built with.

    `action_dim`, `action_horizon` and `max_token_len` (None: the model's
    default) must be integers >= 1; `lora_scale` a finite number > 0.

    Args:
        flags: name the settings as command-line flags (`--action-horizon`).
        **settings: the values, by argument name.
    """
    for name, value in settings.items():
        shown = "--" + name.replace("_", "-") if flags else name
        if name == "lora_scale":
            valid = isinstance(value, numbers.Real) and math.isfinite(value) and value > 0
            expected = "a finite number > 0 (openpi's LoRA alpha / rank, 1.0 for its models)"
        elif name == "max_token_len" and value is None:
            continue
        else:
            valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            valid = valid and value >= 1
            expected = "an integer >= 1"
        if not valid:
            raise ValueError(f"{shown} must be {expected}, got {value!r}.")


def _check_model_type(params, model, source):
    found = openpi_model_type(params)
    if found != model:
        raise ValueError(
            f"--model {model} was asked for, but the checkpoint {str(source)!r} holds "
            f"a {found} model (π0.5 has time_mlp_in, π0 has state_proj, π0-FAST has a "
            "single Gemma and no action projections)."
        )


__all__ = [
    "check_settings",
    "export_lerobot",
    "export_openpi",
    "kept_openpi_lora",
    "to_openpi_params",
    "pi0_from_lerobot",
    "load_openpi_params",
    "load_paligemma_weights",
    "load_pi0_fast_weights",
    "load_pi0_weights",
    "openpi_lora_config",
    "openpi_model_type",
    "pi0_config_from_params",
    "pi0_config_from_paligemma",
    "pi0_fast_config_from_params",
    "pi0_fast_from_openpi",
    "pi0_fast_from_paligemma",
    "pi0_from_openpi",
    "pi0_from_paligemma",
    "policy_from_paligemma",
]
