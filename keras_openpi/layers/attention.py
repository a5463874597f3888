"""Gemma attention: per-expert projections and the joint (mixture) attention."""

import keras
from keras import ops

from keras_openpi.layers.lora_dense import LoRAEinsumDense

# openpi's (and Gemma's) mask fill: finite, so that a fully masked query row
# (a masked camera, padding) gets uniform attention instead of NaN.
MASK_FILL_VALUE = -2.3819763e38


def joint_attention(queries, keys, values, attention_mask):
    """Scaled dot-product attention with MQA/GQA, float32 logits and softmax.

    The G query heads that share a key/value head are folded into the query
    rows, `(B, K, T * G, H)`, so that both products are plain batched matrix
    products over `(B, K)`: with one kv head (Gemma's MQA) no head transpose
    is needed at all, and the gradients need no transposed copy of the
    (large) attention probabilities.

    Args:
        queries: (B, T, N, H), already rotated and scaled by `H ** -0.5`.
        keys: (B, S, K, H), rotated; N must be a multiple of K.
        values: (B, S, K, H).
        attention_mask: (B, T, S) bool, true where query t may attend key s.

    Returns:
        (B, T, N, H) in the dtype of `values`.
    """
    _, length, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_query_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({num_kv_heads})."
        )
    groups = num_heads // num_kv_heads
    # (B, T, K, G, H) -> (B, K, T * G, H); keys and values -> (B, K, S, H).
    q = ops.reshape(queries, (-1, length, num_kv_heads, groups, head_dim))
    q = ops.reshape(ops.transpose(q, (0, 2, 1, 3, 4)), (-1, num_kv_heads, length * groups, head_dim))
    k = ops.transpose(keys, (0, 2, 1, 3))
    v = ops.transpose(values, (0, 2, 1, 3))
    logits = ops.einsum("BKQH,BKSH->BKQS", ops.cast(q, "float32"), ops.cast(k, "float32"))
    logits = ops.reshape(logits, (-1, num_kv_heads, length, groups, logits.shape[-1]))
    mask = ops.cast(attention_mask, "bool")[:, None, :, None, :]
    logits = ops.where(mask, logits, MASK_FILL_VALUE)
    probs = ops.cast(ops.softmax(logits, axis=-1), values.dtype)
    probs = ops.reshape(probs, (-1, num_kv_heads, length * groups, probs.shape[-1]))
    encoded = ops.einsum("BKQS,BKSH->BKQH", probs, v)
    encoded = ops.reshape(encoded, (-1, num_kv_heads, length, groups, head_dim))
    encoded = ops.transpose(encoded, (0, 2, 1, 3, 4))
    return ops.reshape(encoded, (-1, length, num_heads, head_dim))


@keras.saving.register_keras_serializable(package="keras_openpi")
class GemmaAttention(keras.layers.Layer):
    """One expert's attention projections: query, key, value and output.

    The attention itself is computed jointly over all experts by
    `DecoderBlock` with `joint_attention`; this layer owns the weights.
    Kernel layouts follow Gemma: query (N, D, H), key/value (K, D, H),
    output (N, H, D).

    Args:
        num_query_heads: N.
        num_key_value_heads: K (1 for MQA).
        head_dim: H.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> attention = GemmaAttention(num_query_heads=8, num_key_value_heads=1, head_dim=16)
    >>> attention.build((None, None, 64))
    >>> q, k, v = attention.project_qkv(keras.ops.ones((2, 5, 64)))
    >>> q.shape, k.shape
    ((2, 5, 8, 16), (2, 5, 1, 16))
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim

    def build(self, input_shape):
        width = input_shape[-1]
        heads, kv_heads, head_dim = (
            self.num_query_heads,
            self.num_key_value_heads,
            self.head_dim,
        )

        def einsum_dense(equation, output_shape, name):
            return LoRAEinsumDense(
                equation,
                output_shape=output_shape,
                kernel_initializer="lecun_normal",
                dtype=self.dtype_policy,
                name=name,
            )

        # === Layers ===
        self.query = einsum_dense("btd,ndh->btnh", (None, heads, head_dim), "query")
        self.key = einsum_dense("bsd,kdh->bskh", (None, kv_heads, head_dim), "key")
        self.value = einsum_dense(
            "bsd,kdh->bskh", (None, kv_heads, head_dim), "value"
        )
        self.output_projection = einsum_dense(
            "btnh,nhd->btd", (None, width), "output"
        )
        for layer in (self.query, self.key, self.value):
            layer.build((None, None, width))
        self.output_projection.build((None, None, heads, head_dim))
        self.built = True

    def project_qkv(self, x):
        """(B, T, D) -> queries (B, T, N, H), keys and values (B, T, K, H).

        Rotary embedding and query scaling are applied by the caller, over the
        sequence of all experts (see `DecoderBlock`).
        """
        return self.query(x), self.key(x), self.value(x)

    def project_output(self, encoded):
        """(B, T, N, H) attention output -> (B, T, D)."""
        return self.output_projection(encoded)

    def get_config(self):
        return {
            **super().get_config(),
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
        }
