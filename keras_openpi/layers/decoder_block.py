"""A Gemma decoder block shared by several experts (π0's mixture of transformers)."""

import keras
from keras import ops

from keras_openpi.layers.attention import GemmaAttention
from keras_openpi.layers.attention import joint_attention
from keras_openpi.layers.call_levers import CallLeversMixin
from keras_openpi.layers.feed_forward import GatedFeedForward
from keras_openpi.layers.rms_norm import AdaptiveRMSNorm
from keras_openpi.layers.rms_norm import RMSNorm
from keras_openpi.layers.rotary import apply_rotary_embedding


def _norm(cond_dim, name, dtype):
    if cond_dim:
        return AdaptiveRMSNorm(cond_dim=cond_dim, dtype=dtype, name=name)
    return RMSNorm(dtype=dtype, name=name)


def apply_norm(norm, x, cond):
    """Applies a plain or adaptive RMS norm; returns `(normed, gate or None)`."""
    if isinstance(norm, AdaptiveRMSNorm):
        if cond is None:
            raise ValueError(
                f"`{norm.path}` is an adaptive RMS norm and needs a condition "
                "(π0.5's time embedding), got None."
            )
        return norm(x, cond)
    return norm(x), None


def gated_residual(x, y, gate):
    return x + y if gate is None else x + y * gate


@keras.saving.register_keras_serializable(package="keras_openpi")
class DecoderExpert(keras.layers.Layer):
    """One expert's weights inside a `DecoderBlock`: norms, attention projections, feed-forward.

    Args:
        width: the expert's model width D.
        mlp_dim: the feed-forward inner width.
        num_query_heads: N, shared by all experts of the block.
        num_key_value_heads: K, shared.
        head_dim: H, shared.
        adaptive_norm_dim: when set, the norms are adaRMS conditioned on a
            vector of this width (π0.5's action expert); else plain RMS norms.
        **kwargs: standard `keras.layers.Layer` arguments.
    """

    def __init__(
        self,
        width,
        mlp_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        adaptive_norm_dim=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.width = width
        self.mlp_dim = mlp_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.adaptive_norm_dim = adaptive_norm_dim

        # === Layers ===
        dtype = self.dtype_policy
        self.pre_attention_norm = _norm(adaptive_norm_dim, "pre_attention_norm", dtype)
        self.attention = GemmaAttention(
            num_query_heads, num_key_value_heads, head_dim, dtype=dtype, name="attention"
        )
        self.pre_feed_forward_norm = _norm(
            adaptive_norm_dim, "pre_feed_forward_norm", dtype
        )
        self.feed_forward = GatedFeedForward(mlp_dim, dtype=dtype, name="feed_forward")

    def build(self, input_shape=None):
        shape = (None, None, self.width)
        for layer in (
            self.pre_attention_norm,
            self.attention,
            self.pre_feed_forward_norm,
            self.feed_forward,
        ):
            layer.build(shape)
        self.built = True

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "mlp_dim": self.mlp_dim,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "adaptive_norm_dim": self.adaptive_norm_dim,
        }


@keras.saving.register_keras_serializable(package="keras_openpi")
class DecoderBlock(CallLeversMixin, keras.layers.Layer):
    """A pre-norm Gemma block over several experts that attend jointly.

    Each expert projects its own tokens with its own weights; queries, keys and
    values of all experts are concatenated along the sequence and attend
    together under one mask; each expert then applies its own output projection
    and feed-forward to its own tokens. An expert whose input is `None` is
    skipped (π0 runs the prefix through the VLM alone, then the action expert
    alone against the cached prefix keys and values).

    Args:
        experts: list of dicts, one per expert, with keys `name`, `width`,
            `mlp_dim` and optionally `adaptive_norm_dim`.
        num_query_heads: N.
        num_key_value_heads: K.
        head_dim: H.
        max_wavelength: rotary embedding wavelength.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        xs: list (one per expert) of (B, T_e, D_e) tensors or None.
        positions: (B, T) positions of the concatenated non-None inputs.
        attention_mask: (B, T, S) bool, S = cached length + T.
        conds: optional list of per-expert adaRMS conditions (B, C) or None.
        kv_cache: optional `(keys, values)`, (B, S - T, K, H) each, prepended
            to this block's keys and values; or, with `cache_index`, a
            preallocated cache of (B, S, K, H) each.
        cache_index: with a preallocated `kv_cache`, the (scalar, possibly
            traced) slot where this call's T keys and values are written
            (`ops.slice_update`); the queries then attend over all S slots
            (unwritten slots hold zeros; mask them out). This is π0-FAST's
            decoding cache: prefill at 0, then one token at a time.

    Returns:
        `(outputs, (keys, values))`: the per-expert outputs (None where the
        input was None) and the rotated keys and values of length S (the
        updated cache when `cache_index` is given).

    Example:
    >>> block = DecoderBlock(
    ...     experts=[{"name": "vlm", "width": 64, "mlp_dim": 128},
    ...              {"name": "action_expert", "width": 32, "mlp_dim": 64}],
    ...     num_query_heads=8, num_key_value_heads=1, head_dim=16)
    >>> block.build()
    >>> xs = [keras.ops.ones((2, 6, 64)), keras.ops.ones((2, 3, 32))]
    >>> mask = keras.ops.ones((2, 9, 9), "bool")
    >>> outs, _ = block(xs, keras.ops.ones((2, 9), "int32"), mask)
    >>> [o.shape for o in outs]
    [(2, 6, 64), (2, 3, 32)]
    """

    def __init__(
        self,
        experts,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        max_wavelength=10_000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.expert_configs = [dict(e) for e in experts]
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_wavelength = max_wavelength

        # === Layers ===
        self.experts = [
            DecoderExpert(
                width=e["width"],
                mlp_dim=e["mlp_dim"],
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                adaptive_norm_dim=e.get("adaptive_norm_dim"),
                dtype=self.dtype_policy,
                name=e["name"],
            )
            for e in self.expert_configs
        ]

    def build(self, input_shape=None):
        for expert in self.experts:
            expert.build()
        self.built = True

    def call(
        self, xs, positions, attention_mask, conds=None, kv_cache=None, cache_index=None
    ):
        return self.run_forward(
            xs, positions, attention_mask, conds=conds, kv_cache=kv_cache, cache_index=cache_index
        )

    def forward(
        self, xs, positions, attention_mask, conds=None, kv_cache=None, cache_index=None
    ):
        if len(xs) != len(self.experts):
            raise ValueError(
                f"{self.name} has {len(self.experts)} experts, got {len(xs)} inputs."
            )
        conds = conds if conds is not None else [None] * len(xs)
        active = [i for i, x in enumerate(xs) if x is not None]

        # Attention over the concatenated sequence of all active experts.
        gates, qkvs = {}, []
        for i in active:
            expert = self.experts[i]
            normed, gates[i] = apply_norm(expert.pre_attention_norm, xs[i], conds[i])
            qkvs.append(expert.attention.project_qkv(normed))
        queries, keys, values = (ops.concatenate(t, axis=1) for t in zip(*qkvs))
        queries = apply_rotary_embedding(queries, positions, self.max_wavelength)
        queries = queries * ops.cast(self.head_dim**-0.5, queries.dtype)
        keys = apply_rotary_embedding(keys, positions, self.max_wavelength)
        if cache_index is not None:
            if kv_cache is None:
                raise ValueError(f"{self.name}: cache_index needs a preallocated kv_cache.")
            start = (0, cache_index, 0, 0)
            keys = ops.slice_update(kv_cache[0], start, ops.cast(keys, kv_cache[0].dtype))
            values = ops.slice_update(kv_cache[1], start, ops.cast(values, kv_cache[1].dtype))
        elif kv_cache is not None:
            keys = ops.concatenate([ops.cast(kv_cache[0], keys.dtype), keys], axis=1)
            values = ops.concatenate(
                [ops.cast(kv_cache[1], values.dtype), values], axis=1
            )
        encoded = joint_attention(queries, keys, values, attention_mask)

        outputs = list(xs)
        start = 0
        for i in active:
            expert = self.experts[i]
            end = start + xs[i].shape[1]
            attended = expert.attention.project_output(encoded[:, start:end])
            start = end
            x = gated_residual(xs[i], attended, gates[i])
            normed, gate = apply_norm(expert.pre_feed_forward_norm, x, conds[i])
            outputs[i] = gated_residual(x, expert.feed_forward(normed), gate)
        return outputs, (keys, values)

    def get_config(self):
        return {
            **super().get_config(),
            "experts": self.expert_configs,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_wavelength": self.max_wavelength,
        }
