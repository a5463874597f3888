"""Merging openpi's LoRA adapters into their base weights."""

import numpy as np

from keras_openpi.convert.openpi_params import check_weight

# How `lora_a @ lora_b` maps onto each kind of openpi base weight (all arrays
# carry a leading depth axis `l`), and whether openpi applies `alpha / rank` to
# it (its feed-forward path does not).
_MERGES = {
    "q_einsum": ("lndr,lnrh->lndh", True),
    "kv_einsum": ("lckdr,lckrh->lckdh", True),
    # openpi's output einsum sums lora_b over heads: only sum_n lora_b[n] matters.
    "attn_vec_einsum": ("lnhr,lrd->lnhd", True),
    "gating_einsum": ("lcdr,lcrf->lcdf", False),
    "linear": ("lfr,lrd->lfd", False),
}


def _kind(base_key):
    """`.../attn/q_einsum_1/w` -> `q_einsum`; `.../mlp_1/linear` -> `linear`."""
    parts = base_key.split("/")
    name = parts[-2] if parts[-1] == "w" else parts[-1]
    return name[:-2] if name.endswith("_1") else name


def merge_openpi_lora(params, scale=1.0):
    """Returns `params` with every openpi LoRA pair merged into its base weight.

    Args:
        params: flat openpi parameter dict (see `load_openpi_params`).
        scale: openpi's `alpha / rank` (1.0 for every variant openpi ships).

    Returns:
        a new flat dict without `lora_a` / `lora_b` entries.
    """
    merged = dict(params)
    for key in [k for k in params if k.endswith("lora_a")]:
        b_key = key[: -len("lora_a")] + "lora_b"
        if key.endswith("/lora_a"):
            base_key = key[: -len("lora_a")] + "w"
        else:  # feed-forward: gating_einsum_lora_a, linear_lora_a
            base_key = key[: -len("_lora_a")]
        if b_key not in params or base_key not in params:
            raise ValueError(
                f"openpi LoRA weight {key!r} needs {b_key!r} and {base_key!r} in the checkpoint."
            )
        kind = _kind(base_key)
        if kind not in _MERGES:
            raise ValueError(f"Don't know how to merge the openpi LoRA weight {key!r}.")
        equation, scaled = _MERGES[kind]
        # In float32, whatever the stored dtype (a bfloat16 checkpoint's merge is not rounded twice).
        lora_a, lora_b = (np.asarray(params[k], np.float32) for k in (key, b_key))
        if kind == "attn_vec_einsum":
            lora_b = lora_b.sum(axis=1)
        delta = np.einsum(equation, lora_a, lora_b)
        base = np.asarray(params[base_key], np.float32)
        merged[base_key] = base + (scale if scaled else 1.0) * delta
        check_weight(base_key, merged[base_key], f"the LoRA merge (lora_scale={scale})")
        del merged[key], merged[b_key]
    return merged
