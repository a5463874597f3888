"""Hugging Face / LeRobot π0 and π0.5 checkpoints (`model.safetensors` + `config.json`) in and out.

Two layouts share the tensors (see `lerobot_weights`): LeRobot's policies (`lerobot/pi0_base`,
`lerobot/pi05_base`, anything fine-tuned with `lerobot-train`: names under `model.`, a `PI0Config` /
`PI05Config` `config.json` with `"type"`), and openpi's own PyTorch conversion
(`examples/convert_jax_model_to_pytorch.py`: no prefix, a `config.json` with `action_dim`, `action_horizon`,
the variants and `precision`).
"""

import json
import os
import re
import shutil

import numpy as np

from keras_openpi.convert.lerobot_weights import EXPERT
from keras_openpi.convert.lerobot_weights import LANGUAGE
from keras_openpi.convert.lerobot_weights import UNUSED
from keras_openpi.convert.lerobot_weights import VISION
from keras_openpi.convert.lerobot_weights import lerobot_slices
from keras_openpi.convert.lerobot_weights import load_lerobot_weights
from keras_openpi.convert.safetensors_io import SafetensorsReader
from keras_openpi.convert.safetensors_io import write_safetensors
from keras_openpi.convert.weight_slices import merged_values

LAYOUTS = ("lerobot", "openpi-pytorch")
# LeRobot's (and openpi's) Gemma variants: query and key/value heads are not in the weight shapes.
# LeRobot's joint attention also hard-codes 8 query heads.
VARIANTS = {
    "gemma_2b": dict(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": dict(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
}
# LeRobot's SigLIP is transformers' PaliGemma default (So400m/14: 16 heads) with an MLP of 4304.
SIGLIP_HEADS = 16
IMAGE_PREFIX = "observation.images."


def read_config(source, layout):
    """`config.json` of a LeRobot / openpi-PyTorch checkpoint directory, with the path of its weights."""
    source = os.fspath(source)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"No checkpoint directory at {source!r} (it should hold model.safetensors and config.json)."
        )
    weights, config_path = (os.path.join(source, name) for name in ("model.safetensors", "config.json"))
    for path in (weights, config_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source!r} has no {os.path.basename(path)}.")
    try:
        with open(config_path) as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path!r} is not valid JSON: {error}") from None
    if layout == "lerobot" and config.get("type") not in ("pi0", "pi05"):
        raise ValueError(
            f"{config_path!r} has type {config.get('type')!r}; a LeRobot π0 / π0.5 config has "
            "type 'pi0' or 'pi05' (for openpi's PyTorch conversion use the openpi-pytorch format)."
        )
    return config, weights


def _depth(reader, layers):
    """1 + the highest `i` of any tensor named `{layers}.{i}.*`."""
    found = [re.match(re.escape(layers) + r"\.(\d+)\.", key) for key in reader.keys()]
    return 1 + max((int(m.group(1)) for m in found if m), default=-1)


def _shape(reader, name):
    if name not in reader:
        raise ValueError(f"{reader.path!r} has no tensor {name!r}.")
    return reader.shape(name)


def _gemma(reader, base, variant, role):
    if variant not in VARIANTS:
        raise ValueError(f"Unknown {role} {variant!r}; LeRobot's variants are {sorted(VARIANTS)}.")
    heads = VARIANTS[variant]
    q_rows, width = _shape(reader, f"{base}.layers.0.self_attn.q_proj.weight")
    head_dim = q_rows // heads["num_heads"]
    k_name = f"{base}.layers.0.self_attn.k_proj.weight"
    if _shape(reader, k_name) != (heads["num_kv_heads"] * head_dim, width):
        raise ValueError(
            f"{reader.path!r}: tensor {k_name!r} has shape {_shape(reader, k_name)}; a {variant} with "
            f"{heads['num_heads']} query heads of {head_dim} needs {(heads['num_kv_heads'] * head_dim, width)}."
        )
    return dict(
        width=width,
        depth=_depth(reader, f"{base}.layers"),
        mlp_dim=_shape(reader, f"{base}.layers.0.mlp.gate_proj.weight")[0],
        num_heads=heads["num_heads"],
        num_kv_heads=heads["num_kv_heads"],
        head_dim=head_dim,
    )


def _image_keys(config):
    keys = [
        key[len(IMAGE_PREFIX) :] if key.startswith(IMAGE_PREFIX) else key
        for key, feature in config.get("input_features", {}).items()
        if feature.get("type") == "VISUAL"
    ]
    for i in range(config.get("empty_cameras", 0)):  # LeRobot adds these when it builds the model
        if f"empty_camera_{i}" not in keys:
            keys.append(f"empty_camera_{i}")
    return keys


def architecture(reader, config, layout):
    """`Pi0` arguments of a checkpoint: dimensions from the tensor shapes, the rest from its config.

    Raises:
        ValueError: a config that contradicts the weights (π0 vs π0.5, action or
            state width, image resolution), naming the tensor and both values.
    """
    pi05 = "time_mlp_in.weight" in reader
    action_dim = _shape(reader, "action_in_proj.weight")[1]
    if "state_proj.weight" in reader and _shape(reader, "state_proj.weight")[1] != action_dim:
        raise ValueError(
            f"tensor 'state_proj.weight' has shape {_shape(reader, 'state_proj.weight')} and "
            f"'action_in_proj.weight' {_shape(reader, 'action_in_proj.weight')}: keras_openpi's π0, like "
            "openpi's, takes state and actions of one width (max_state_dim must equal max_action_dim)."
        )
    patch_name = f"{VISION}.embeddings.patch_embedding.weight"
    vision_width, _, patch, _ = _shape(reader, patch_name)
    positions = _shape(reader, f"{VISION}.embeddings.position_embedding.weight")[0]
    kwargs = dict(
        paligemma_variant=_gemma(reader, LANGUAGE, config.get("paligemma_variant", "gemma_2b"), "paligemma_variant"),
        action_expert_variant=_gemma(
            reader, EXPERT, config.get("action_expert_variant", "gemma_300m"), "action_expert_variant"
        ),
        vision_variant=dict(
            width=vision_width,
            depth=_depth(reader, f"{VISION}.encoder.layers"),
            mlp_dim=_shape(reader, f"{VISION}.encoder.layers.0.mlp.fc1.weight")[0],
            num_heads=SIGLIP_HEADS,
            patch_size=patch,
        ),
        vocabulary_size=_shape(reader, f"{LANGUAGE}.embed_tokens.weight")[0],
        action_dim=action_dim,
        pi05=pi05,
    )
    if layout == "openpi-pytorch":
        if config.get("action_dim", action_dim) != action_dim:
            raise ValueError(
                f"config.json has action_dim {config['action_dim']}, but tensor 'action_in_proj.weight' "
                f"has shape {_shape(reader, 'action_in_proj.weight')} (action_dim {action_dim})."
            )
        kwargs["action_horizon"] = config.get("action_horizon", 50)
        side = int(round(positions**0.5))  # openpi's config has no image size: square images
        resolution = (side * patch, side * patch)
    else:
        if (config["type"] == "pi05") != pi05:
            raise ValueError(
                f"config.json has type {config['type']!r}, but the weights are a "
                f"{'π0.5' if pi05 else 'π0'} model (tensor 'time_mlp_in.weight' is "
                f"{'present' if pi05 else 'absent'})."
            )
        for key, name in (("max_action_dim", "action_in_proj.weight"), ("max_state_dim", "state_proj.weight")):
            if name in reader and config.get(key, 32) != _shape(reader, name)[1]:
                raise ValueError(
                    f"config.json has {key} {config.get(key, 32)}, but tensor {name!r} has shape "
                    f"{_shape(reader, name)}."
                )
        kwargs["action_horizon"] = config.get("chunk_size", 50)
        kwargs["max_token_len"] = config.get("tokenizer_max_length")
        resolution = tuple(config.get("image_resolution", (224, 224)))
        image_keys = _image_keys(config)
        if image_keys:
            kwargs["image_keys"] = image_keys
    side = resolution[0] // patch
    if resolution[0] != resolution[1] or side * side != positions:
        raise ValueError(
            f"image_resolution {list(resolution)} does not fit tensor "
            f"'{VISION}.embeddings.position_embedding.weight' of {positions} positions "
            f"with {patch}x{patch} patches."
        )
    kwargs["image_resolution"] = resolution
    return kwargs


def pi0_from_lerobot(
    source,
    layout="lerobot",
    action_horizon=None,
    max_token_len=None,
    model=None,
    **kwargs,
):
    """Builds a `Pi0` from a Hugging Face / LeRobot π0 or π0.5 checkpoint directory.

    Dimensions come from the tensor shapes; horizon, prompt length, cameras and
    image size from `config.json`; arguments given here override the config.
    Tensors are read one at a time, so the import holds the model and one tensor.

    Args:
        source: a directory with `model.safetensors` and `config.json`.
        layout: `"lerobot"` (LeRobot policies) or `"openpi-pytorch"` (openpi's
            `convert_jax_model_to_pytorch.py`).
        action_horizon: H (default: `chunk_size` / `action_horizon` of the config).
        max_token_len: prompt length (default: `tokenizer_max_length`, else 48 / 200).
        model: `"pi0"` or `"pi05"` to insist on one; must agree with the checkpoint.
        **kwargs: more `Pi0` arguments (`dtype`, `image_keys`, ...).

    Returns:
        a `keras_openpi.models.Pi0` holding the checkpoint's weights.

    Raises:
        FileNotFoundError: no such directory, or a file missing in it.
        ValueError: a missing or misshapen tensor (named, with both shapes) or a
            config that contradicts the weights.
    """
    from keras_openpi.models import Pi0

    config, weights = read_config(source, layout)
    with SafetensorsReader(weights, strip_prefix="model.") as reader:
        arguments = architecture(reader, config, layout)
        if model is not None and model != ("pi05" if arguments["pi05"] else "pi0"):
            raise ValueError(
                f"--model {model} was asked for, but {str(source)!r} holds a "
                f"{'pi05' if arguments['pi05'] else 'pi0'} model (π0.5 has time_mlp_in, π0 has state_proj)."
            )
        if action_horizon is not None:
            arguments["action_horizon"] = action_horizon
        if max_token_len is not None:
            arguments["max_token_len"] = max_token_len
        arguments.update(kwargs)
        policy = Pi0(**arguments)
        unused = load_lerobot_weights(policy, reader)
    unknown = [name for name in unused if name not in UNUSED]
    if unknown:
        raise ValueError(f"{weights!r} holds tensors that no π0 weight uses: {unknown[:5]}.")
    return policy


# === Export ===


def _variant_name(dims, role, given):
    if given is not None:
        return given
    for name, variant in VARIANTS.items():
        if variant == dims:
            return name
    raise ValueError(
        f"LeRobot builds its {role} from a variant name ({sorted(VARIANTS)}), and this model's "
        f"{dims} is none of them."
    )


def lerobot_config(model, paligemma_variant=None, action_expert_variant=None):
    """A LeRobot `PI0Config` / `PI05Config` `config.json` dict for a `Pi0`."""
    from keras_openpi.models.variants import resolve_gemma_variant
    from keras_openpi.models.variants import resolve_siglip_variant

    vision = resolve_siglip_variant(model.vision_variant)
    so400m = resolve_siglip_variant("So400m/14")
    if paligemma_variant is None and vision != so400m:
        raise ValueError(f"LeRobot's SigLIP is So400m/14 {so400m}; this model's is {vision}.")
    height, width = model.image_resolution
    features = {
        f"{IMAGE_PREFIX}{key}": {"type": "VISUAL", "shape": [3, height, width]} for key in model.image_keys
    }
    features["observation.state"] = {"type": "STATE", "shape": [model.action_dim]}
    return {
        "type": "pi05" if model.pi05 else "pi0",
        "n_obs_steps": 1,
        "input_features": features,
        "output_features": {"action": {"type": "ACTION", "shape": [model.action_dim]}},
        "paligemma_variant": _variant_name(
            resolve_gemma_variant(model.paligemma_variant), "paligemma_variant", paligemma_variant
        ),
        "action_expert_variant": _variant_name(
            resolve_gemma_variant(model.action_expert_variant), "action_expert_variant", action_expert_variant
        ),
        "dtype": "float32",
        "chunk_size": model.action_horizon,
        "n_action_steps": model.action_horizon,
        "max_state_dim": model.action_dim,
        "max_action_dim": model.action_dim,
        "image_resolution": [height, width],
        "tokenizer_max_length": model.max_token_len,
    }


def export_lerobot(model, output, paligemma_variant=None, action_expert_variant=None, dtype="float32"):
    """Writes a `Pi0` as a LeRobot checkpoint directory that `PI0Policy.from_pretrained` loads.

    LoRA adapters are merged into their kernels. Tensors are written one at a
    time. LeRobot's unused language-model heads are written too, as its strict
    loading expects them: PaliGemma's tied to the token embedding, the action
    expert's as zeros (vocabulary x expert width).

    Args:
        model: a `keras_openpi.models.Pi0`.
        output: a directory that does not exist yet (it is created whole or not at all).
        paligemma_variant, action_expert_variant: the variant names written to
            `config.json` (default: the LeRobot variant whose dimensions the model has).
        dtype: `"float32"` or `"bfloat16"` tensors.

    Raises:
        FileExistsError: `output` exists.
        ValueError: a model LeRobot cannot build (not π0 / π0.5, dimensions of no
            LeRobot variant), or a quantized model.
    """
    from keras_openpi.models import Pi0

    if not isinstance(model, Pi0):
        raise ValueError(f"LeRobot export takes a π0 / π0.5 model, got {type(model).__name__}.")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    output = os.fspath(output)
    if os.path.exists(output):
        raise FileExistsError(f"{output!r} exists; choose a new output directory.")
    config = lerobot_config(model, paligemma_variant, action_expert_variant)
    config["dtype"] = dtype
    value = merged_values(model)
    tensors = []
    embedding = None
    for name, torch_shape, _, to_torch, variable in lerobot_slices(model):
        produce = lambda variable=variable, to_torch=to_torch: to_torch(value(variable))  # noqa: E731
        tensors.append((f"model.{name}", dtype, torch_shape, produce))
        if name == f"{LANGUAGE}.embed_tokens.weight":
            embedding = (torch_shape, produce)
    tensors.append((f"model.{UNUSED[0]}", dtype, embedding[0], embedding[1]))
    expert_head = (model.vocabulary_size, model.expert_width)
    tensors.append((f"model.{UNUSED[1]}", dtype, expert_head, lambda: np.zeros(expert_head, np.float32)))
    tensors.sort(key=lambda t: t[0])
    partial = output.rstrip("/") + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    try:
        write_safetensors(os.path.join(partial, "model.safetensors"), tensors, metadata={"format": "pt"})
        with open(os.path.join(partial, "config.json"), "w") as handle:
            json.dump(config, handle, indent=4)
        os.rename(partial, output)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    return output
