"""The map between LeRobot's (and openpi PyTorch's) π0 / π0.5 tensors and openpi's parameters.

LeRobot's `PI0Policy` / `PI05Policy` and openpi's `PI0Pytorch` name their weights alike
(`paligemma_with_expert.paligemma.model.language_model.layers.3.self_attn.q_proj.weight`, ...; LeRobot under a
`model.` prefix). Each is one slice of an openpi parameter (layer 3 of `PaliGemma/llm/layers/attn/q_einsum/w`)
in PyTorch's layout. The map is written against openpi's paths, so Keras weights are found through the
existing openpi map (`pi0_weight_map`) and no second Keras naming exists.
"""

import re

import numpy as np

from keras_openpi.convert.pi0_weights import BLOCK
from keras_openpi.convert.pi0_weights import IMG
from keras_openpi.convert.pi0_weights import LLM
from keras_openpi.convert.pi0_weights import pi0_weight_map
from keras_openpi.convert.weight_slices import weight_slices

PALIGEMMA = "paligemma_with_expert.paligemma.model"
LANGUAGE = f"{PALIGEMMA}.language_model"
VISION = f"{PALIGEMMA}.vision_tower.vision_model"
EXPERT = "paligemma_with_expert.gemma_expert.model"
# Weights LeRobot's model holds but never uses: the language-model heads (π0 predicts no tokens).
UNUSED = ("paligemma_with_expert.paligemma.lm_head.weight", "paligemma_with_expert.gemma_expert.lm_head.weight")


# === Layouts: (PyTorch shape from the Keras shape, Keras value from PyTorch's, PyTorch value from Keras') ===


def _heads_in(k):  # Keras (N, D, H) <-> PyTorch (N*H, D)
    n, d, h = k
    return (n * h, d), lambda t: t.reshape(n, h, d).transpose(0, 2, 1), lambda a: a.transpose(0, 2, 1).reshape(n * h, d)


def _heads_out(k):  # Keras (N, H, D) <-> PyTorch (D, N*H)
    n, h, d = k
    return (d, n * h), lambda t: t.T.reshape(n, h, d), lambda a: a.reshape(n * h, d).T


def _vit_in(k):  # Keras (W, N, H) <-> PyTorch (N*H, W)
    w, n, h = k
    return (n * h, w), lambda t: t.T.reshape(w, n, h), lambda a: a.reshape(w, n * h).T


def _vit_out(k):  # Keras (N, H, W) <-> PyTorch (W, N*H)
    n, h, w = k
    return (w, n * h), lambda t: t.T.reshape(n, h, w), lambda a: a.reshape(n * h, w).T


def _flat(k):  # Keras (N, H) <-> PyTorch (N*H,)
    return (int(np.prod(k)),), lambda t: t.reshape(k), lambda a: a.reshape(-1)


def _patch(k):  # Keras (kh, kw, in, out) <-> PyTorch (out, in, kh, kw)
    kh, kw, c, o = k
    return (o, c, kh, kw), lambda t: t.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)


def _positions(k):  # Keras (1, N, W) <-> PyTorch (N, W)
    return tuple(k[1:]), lambda t: t[None], lambda a: a[0]


def _linear(k):  # Keras (in, out) <-> PyTorch (out, in)
    return (k[1], k[0]), lambda t: t.T, lambda a: a.T


def _same(k):
    return tuple(k), lambda t: t, lambda a: a


def _gemma_source(path, index):
    """LeRobot name and layout of one slice of an openpi Gemma parameter, or None."""
    rest = path[len(LLM) + 1 :]
    if rest == "embedder/input_embedding":
        return f"{LANGUAGE}.embed_tokens.weight", _same
    base = EXPERT if re.search(r"_1(/|$)", rest) else LANGUAGE
    plain = re.sub(r"_1(?=/|$)", "", rest)  # q_einsum_1/w -> q_einsum/w, mlp_1/linear -> mlp/linear
    norms = {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}
    for openpi_norm, torch_norm in norms.items():
        if plain.startswith(f"layers/{openpi_norm}/"):
            return _norm(f"{base}.layers.{index[0]}.{torch_norm}", plain.split("/", 2)[2])
    if plain.startswith("final_norm/"):
        return _norm(f"{base}.norm", plain.split("/", 1)[1])
    table = {
        ("layers/attn/q_einsum/w", ()): ("self_attn.q_proj.weight", _heads_in),
        ("layers/attn/kv_einsum/w", (0,)): ("self_attn.k_proj.weight", _heads_in),
        ("layers/attn/kv_einsum/w", (1,)): ("self_attn.v_proj.weight", _heads_in),
        ("layers/attn/attn_vec_einsum/w", ()): ("self_attn.o_proj.weight", _heads_out),
        ("layers/mlp/gating_einsum", (0,)): ("mlp.gate_proj.weight", _linear),
        ("layers/mlp/gating_einsum", (1,)): ("mlp.up_proj.weight", _linear),
        ("layers/mlp/linear", ()): ("mlp.down_proj.weight", _linear),
    }
    found = table.get((plain, tuple(index[1:])))
    return None if found is None or not index else (f"{base}.layers.{index[0]}.{found[0]}", found[1])


def _norm(torch_norm, part):
    return {
        "scale": (f"{torch_norm}.weight", _same),
        "Dense_0/kernel": (f"{torch_norm}.dense.weight", _linear),
        "Dense_0/bias": (f"{torch_norm}.dense.bias", _same),
    }[part]


def _vision_source(path, index):
    if path.startswith(f"{BLOCK}/"):
        layer = f"{VISION}.encoder.layers.{index[0]}"
        part = path[len(BLOCK) + 1 :]
        attention = "MultiHeadDotProductAttention_0/"
        if part.startswith(attention):
            name, kind = part[len(attention) :].split("/")
            torch_name = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}[name]
            if kind == "kernel":
                return f"{layer}.self_attn.{torch_name}.weight", _vit_out if name == "out" else _vit_in
            return f"{layer}.self_attn.{torch_name}.bias", _same if name == "out" else _flat
        module, kind = part.rsplit("/", 1)
        torch_module = {
            "LayerNorm_0": "layer_norm1",
            "LayerNorm_1": "layer_norm2",
            "MlpBlock_0/Dense_0": "mlp.fc1",
            "MlpBlock_0/Dense_1": "mlp.fc2",
        }[module]
        torch_kind = {"scale": "weight", "kernel": "weight", "bias": "bias"}[kind]
        return f"{layer}.{torch_module}.{torch_kind}", _linear if kind == "kernel" else _same
    return {
        f"{IMG}/embedding/kernel": (f"{VISION}.embeddings.patch_embedding.weight", _patch),
        f"{IMG}/embedding/bias": (f"{VISION}.embeddings.patch_embedding.bias", _same),
        f"{IMG}/pos_embedding": (f"{VISION}.embeddings.position_embedding.weight", _positions),
        f"{IMG}/Transformer/encoder_norm/scale": (f"{VISION}.post_layernorm.weight", _same),
        f"{IMG}/Transformer/encoder_norm/bias": (f"{VISION}.post_layernorm.bias", _same),
        f"{IMG}/head/kernel": (f"{PALIGEMMA}.multi_modal_projector.linear.weight", _linear),
        f"{IMG}/head/bias": (f"{PALIGEMMA}.multi_modal_projector.linear.bias", _same),
    }[path]


def lerobot_source(openpi_path, index):
    """`(lerobot_name, layout)` of one slice of an openpi π0 / π0.5 parameter.

    Args:
        openpi_path: e.g. `PaliGemma/llm/layers/attn/kv_einsum_1/w`.
        index: the slice, `()`, `(layer,)` or `(layer, part)` (see `weight_slices`).

    Returns:
        the PyTorch name without LeRobot's `model.` prefix, and a layout function
        `keras_shape -> (torch_shape, to_keras, to_torch)`.
    """
    if openpi_path.startswith(f"{LLM}/"):
        found = _gemma_source(openpi_path, index)
    elif openpi_path.startswith(f"{IMG}/"):
        found = _vision_source(openpi_path, index)
    else:  # action_in_proj/kernel -> action_in_proj.weight
        name, kind = openpi_path.split("/")
        found = (f"{name}.weight", _linear) if kind == "kernel" else (f"{name}.bias", _same)
    if found is None:
        raise ValueError(f"No LeRobot tensor holds openpi's {openpi_path!r}{list(index)}.")
    return found


def lerobot_slices(model):
    """`(lerobot_name, torch_shape, to_keras, to_torch, variable)` for every weight of a `Pi0`."""
    entries = []
    for openpi_path, index, _, variable in weight_slices(model, pi0_weight_map(model)):
        name, layout = lerobot_source(openpi_path, index)
        torch_shape, to_keras, to_torch = layout(tuple(variable.shape))
        entries.append((name, torch_shape, to_keras, to_torch, variable))
    return entries


def load_lerobot_weights(model, reader):
    """Assigns LeRobot / openpi-PyTorch tensors to a `Pi0`, one tensor at a time.

    Every tensor is checked (present, right shape) before any is read; then
    each is read, laid out, cast to its weight's dtype and assigned, so at most
    one tensor is held besides the model.

    Args:
        model: a built `keras_openpi.models.Pi0` of the checkpoint's architecture.
        reader: a `SafetensorsReader` (names without LeRobot's `model.` prefix).

    Returns:
        the names in the file that no weight used (LeRobot's unused LM heads).

    Raises:
        ValueError: a missing tensor or a tensor of the wrong shape, naming it
            and both shapes; the model is then unchanged.
    """
    entries = lerobot_slices(model)
    for name, torch_shape, _, _, variable in entries:
        if name not in reader:
            raise ValueError(
                f"{reader.path!r} has no tensor {name!r}, needed for {variable.path!r} "
                f"(expected shape {torch_shape})."
            )
        if reader.shape(name) != torch_shape:
            raise ValueError(
                f"{reader.path!r}: tensor {name!r} has shape {reader.shape(name)}, but "
                f"{variable.path!r} needs {torch_shape}."
            )
    for name, _, to_keras, _, variable in entries:
        variable.assign(to_keras(reader.get(name)))  # cast to the weight's dtype on assignment
    used = {name for name, *_ in entries}
    return sorted(set(reader.keys()) - used)
