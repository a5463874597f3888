"""openpi's LoRA weights kept unmerged: which checkpoint arrays are adapters, and where they go.

openpi stores each adapter next to its base weight, stacked over depth like
it: `.../attn/q_einsum/lora_a` and `lora_b` beside `.../q_einsum/w` (also
`kv_einsum`, `attn_vec_einsum`), `.../mlp/gating_einsum_lora_a` and
`_lora_b` beside `.../mlp/gating_einsum` (also `linear`). A Keras layer in
openpi's LoRA form (`keras_openpi.layers.LowRankAdaptationMixin`) has A and
B of exactly the shapes of one layer's slice, so an adapter's slice is the
one its base kernel takes.
"""

import re

LAYERS = "PaliGemma/llm/layers"
# The base weights openpi's `*_lora` Gemma variants adapt, per expert suffix.
_ADAPTED = (
    "attn/q_einsum{}/w",
    "attn/kv_einsum{}/w",
    "attn/attn_vec_einsum{}/w",
    "mlp{}/gating_einsum",
    "mlp{}/linear",
)
_ADAPTED_PATH = re.compile(
    rf"{LAYERS}/(attn/(q|kv|attn_vec)_einsum(_\d+)?/w|mlp(_\d+)?/(gating_einsum|linear))"
)


def lora_paths(base_path):
    """`(lora_a, lora_b)` openpi paths of a base weight's adapter.

    Example:
    >>> lora_paths("PaliGemma/llm/layers/mlp_1/linear")
    ('PaliGemma/llm/layers/mlp_1/linear_lora_a', 'PaliGemma/llm/layers/mlp_1/linear_lora_b')
    """
    if base_path.endswith("/w"):
        stem = base_path[: -len("w")]
        return stem + "lora_a", stem + "lora_b"
    return base_path + "_lora_a", base_path + "_lora_b"


def lora_weight_map(entries):
    """The `(openpi_path, keras_path, select)` entries of the adapters of a weight map's kernels.

    Args:
        entries: a model's weight map (`pi0_weight_map`, `pi0_fast_weight_map`).

    Returns:
        for every adapted base kernel, the entries of its `lora_a` ->
        `lora_kernel_a` and `lora_b` -> `lora_kernel_b`, selected as the kernel.
    """
    lora = []
    for openpi_path, keras_path, select in entries:
        if _ADAPTED_PATH.fullmatch(openpi_path) and keras_path.endswith("/kernel"):
            a_path, b_path = lora_paths(openpi_path)
            stem = keras_path[: -len("kernel")]
            lora += [
                (a_path, stem + "lora_kernel_a", select),
                (b_path, stem + "lora_kernel_b", select),
            ]
    return lora


def openpi_lora_config(params, experts, lora_scale=1.0):
    """The openpi-form LoRA configuration of a checkpoint's adapters, per Keras group.

    Args:
        params: flat openpi parameter dict (see `load_openpi_params`).
        experts: `(openpi suffix, Keras group)` pairs, e.g.
            `[("", "vlm"), ("_1", "action_expert")]`.
        lora_scale: openpi's `alpha / rank` for the einsums (its configs: 1.0);
            the feed-forward adapters are not scaled whatever it is.

    Returns:
        `{group: {"rank": r, "alpha": lora_scale * r, "form": "openpi"}}` for
        the experts with adapters (empty for a checkpoint without any).

    Raises:
        ValueError: an expert adapted only in part, or with several ranks
            (keras_openpi adapts every einsum and feed-forward matrix of an
            expert with one rank, as openpi's `*_lora` variants).
    """
    config = {}
    for suffix, group in experts:
        pairs = [lora_paths(f"{LAYERS}/{path.format(suffix)}") for path in _ADAPTED]
        wanted = [path for pair in pairs for path in pair]
        present = [path for path in wanted if path in params]
        if not present:
            continue
        missing = [path for path in wanted if path not in params]
        if missing:
            raise ValueError(
                f"the openpi checkpoint adapts only part of the {group} (openpi suffix "
                f"{suffix!r}): it has {len(present)} of its {len(wanted)} LoRA weights, not "
                f"{missing[0]!r}. Keeping LoRA unmerged needs every attention einsum and "
                "feed-forward matrix adapted (openpi's *_lora variants); convert without "
                "--keep-lora to merge them."
            )
        ranks = {
            path: params[path].shape[-1 if path.endswith("lora_a") else -2]
            for path in wanted
        }
        if len(set(ranks.values())) != 1:
            shown = ", ".join(
                f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}: {r}"
                for path, r in ranks.items()
            )
            raise ValueError(
                f"the openpi checkpoint's {group} adapters have several ranks ({shown}); "
                "keeping LoRA unmerged needs one rank per expert. Convert without --keep-lora "
                "to merge them."
            )
        rank = int(next(iter(ranks.values())))
        config[group] = {
            "rank": rank,
            "alpha": float(lora_scale * rank),
            "form": "openpi",
        }
    return config
