"""Importing openpi checkpoints."""

from keras_openpi.convert.openpi_params import load_openpi_params
from keras_openpi.convert.pi0_weights import load_pi0_weights
from keras_openpi.convert.pi0_weights import pi0_config_from_params


def pi0_from_openpi(
    source,
    action_horizon,
    max_token_len=None,
    model="pi0",
    lora_scale=1.0,
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
        **kwargs: more `Pi0` arguments (e.g. `dtype`, `image_keys`).

    Returns:
        a `keras_openpi.models.Pi0` holding the checkpoint's weights.
    """
    from keras_openpi.models import Pi0

    if model not in ("pi0", "pi05"):
        raise ValueError(f"model must be 'pi0' or 'pi05', got {model!r}.")
    params = load_openpi_params(source)
    config = pi0_config_from_params(params)
    if config["pi05"] != (model == "pi05"):
        found = "pi05" if config["pi05"] else "pi0"
        raise ValueError(
            f"--model {model} was asked for, but the checkpoint {str(source)!r} holds "
            f"a {found} model (π0.5 has time_mlp_in, π0 has state_proj)."
        )
    policy = Pi0(
        **config, action_horizon=action_horizon, max_token_len=max_token_len, **kwargs
    )
    load_pi0_weights(policy, params, lora_scale=lora_scale)
    return policy


__all__ = [
    "load_openpi_params",
    "load_pi0_weights",
    "pi0_config_from_params",
    "pi0_from_openpi",
]
