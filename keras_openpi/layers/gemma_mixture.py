"""A Gemma transformer whose tokens are split among experts with their own weights."""

import math

import keras
from keras import ops

from keras_openpi.layers.decoder_block import DecoderBlock
from keras_openpi.layers.decoder_block import apply_norm
from keras_openpi.layers.rms_norm import AdaptiveRMSNorm
from keras_openpi.layers.rms_norm import RMSNorm


@keras.saving.register_keras_serializable(package="keras_openpi")
class GemmaMixture(keras.layers.Layer):
    """openpi's multi-expert Gemma: a token embedding, decoder blocks, final norms.

    Expert 0 is the language model (it owns the token embedding, a
    `keras.layers.ReversibleEmbedding` tied to the output logits); the other
    experts (π0's action expert) have their own weights and see the same
    attention. All experts share depth, heads and head dim; widths and
    feed-forward widths may differ.

    Args:
        experts: list of dicts, one per expert: `name`, `width`, `mlp_dim` and
            optionally `adaptive_norm_dim` (adaRMS condition width).
        depth: number of decoder blocks.
        num_query_heads: N.
        num_key_value_heads: K.
        head_dim: H.
        vocabulary_size: rows of the token embedding.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> gemma = GemmaMixture(
    ...     experts=[{"name": "vlm", "width": 64, "mlp_dim": 128}],
    ...     depth=2, num_query_heads=8, num_key_value_heads=1, head_dim=16,
    ...     vocabulary_size=100)
    >>> gemma.build()
    >>> x = gemma.embed_tokens(keras.ops.ones((2, 4), "int32"))
    >>> (out,), cache = gemma([x], keras.ops.ones((2, 4), "int32"), keras.ops.ones((2, 4, 4), "bool"))
    >>> out.shape, len(cache)
    ((2, 4, 64), 2)
    """

    def __init__(
        self,
        experts,
        depth,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        vocabulary_size,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.expert_configs = [dict(e) for e in experts]
        self.depth = depth
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.vocabulary_size = vocabulary_size

        # === Layers ===
        dtype = self.dtype_policy
        self.token_embedding = keras.layers.ReversibleEmbedding(
            vocabulary_size,
            self.expert_configs[0]["width"],
            tie_weights=True,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype=dtype,
            name="token_embedding",
        )
        self.decoder_blocks = [
            DecoderBlock(
                self.expert_configs,
                num_query_heads,
                num_key_value_heads,
                head_dim,
                dtype=dtype,
                name=f"decoder_block_{i}",
            )
            for i in range(depth)
        ]
        self.final_norms = []
        for e in self.expert_configs:
            name = f"{e['name']}_final_norm"
            if e.get("adaptive_norm_dim"):
                norm = AdaptiveRMSNorm(e["adaptive_norm_dim"], dtype=dtype, name=name)
            else:
                norm = RMSNorm(dtype=dtype, name=name)
            self.final_norms.append(norm)

    def build(self, input_shape=None):
        self.token_embedding.build((None, None))
        for block in self.decoder_blocks:
            block.build()
        for norm, e in zip(self.final_norms, self.expert_configs):
            norm.build((None, None, e["width"]))
        self.built = True

    def embed_tokens(self, token_ids):
        """(B, L) ids -> (B, L, D) embeddings scaled by sqrt(D), as Gemma does."""
        x = self.token_embedding(token_ids)
        return x * ops.cast(math.sqrt(self.expert_configs[0]["width"]), x.dtype)

    def decode_logits(self, x):
        """(B, T, D) -> (B, T, V) float32 logits with the tied token embedding.

        The embedding's own reverse call (`ReversibleEmbedding(reverse=True)`),
        so that an int8-quantized table is descaled as in the forward lookup.
        """
        return ops.cast(self.token_embedding(x, reverse=True), "float32")

    def init_kv_cache(self, batch_size, length, dtype=None):
        """A preallocated all-zero cache: one `(keys, values)` of (B, S, K, H) per block."""
        shape = (batch_size, length, self.num_key_value_heads, self.head_dim)
        dtype = dtype or self.compute_dtype
        return [(ops.zeros(shape, dtype), ops.zeros(shape, dtype)) for _ in self.decoder_blocks]

    def call(
        self, xs, positions, attention_mask, conds=None, kv_cache=None, cache_index=None
    ):
        """Runs the blocks and the final norms.

        Args:
            xs: list (one per expert) of (B, T_e, D_e) embeddings or None.
            positions: (B, T) positions of the concatenated non-None inputs.
            attention_mask: (B, T, S) bool.
            conds: optional per-expert adaRMS conditions.
            kv_cache: optional list (one per block) of `(keys, values)`.
            cache_index: with a preallocated `kv_cache` (see `init_kv_cache`),
                the slot where this call's keys and values are written; the
                queries attend over the whole cache (see `DecoderBlock`).

        Returns:
            `(outputs, kv_cache)`: per-expert (B, T_e, D_e) outputs after the
            final norm (None where skipped), and one `(keys, values)` per block.
        """
        conds = conds if conds is not None else [None] * len(xs)
        xs = [None if x is None else ops.cast(x, self.compute_dtype) for x in xs]
        new_cache = []
        for i, block in enumerate(self.decoder_blocks):
            xs, block_kv = block(
                xs,
                positions,
                attention_mask,
                conds=conds,
                kv_cache=None if kv_cache is None else kv_cache[i],
                cache_index=cache_index,
            )
            new_cache.append(block_kv)
        outputs = [
            None if x is None else apply_norm(norm, x, cond)[0]
            for x, norm, cond in zip(xs, self.final_norms, conds)
        ]
        return outputs, new_cache

    def get_config(self):
        return {
            **super().get_config(),
            "experts": self.expert_configs,
            "depth": self.depth,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocabulary_size": self.vocabulary_size,
        }
