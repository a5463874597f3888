"""The SigLIP vision transformer (big_vision ViT) used by PaliGemma and π0."""

import keras
from keras import ops

from keras_openpi.layers.call_levers import CallLeversMixin
from keras_openpi.layers.layer_norm import LayerNorm


def _gelu_tanh(x):
    return ops.gelu(x, approximate=True)


@keras.saving.register_keras_serializable(package="keras_openpi")
class SigLIPBlock(CallLeversMixin, keras.layers.Layer):
    """Pre-LayerNorm ViT block: `x + attn(ln(x))`, then `x + mlp(ln(x))`.

    Args:
        num_heads: attention heads; the head dim is `width / num_heads`.
        mlp_dim: the MLP's inner width (GELU, tanh approximation).
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> block = SigLIPBlock(num_heads=4, mlp_dim=128)
    >>> block(keras.ops.ones((2, 10, 64))).shape
    (2, 10, 64)
    """

    def __init__(self, num_heads, mlp_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim

    def build(self, input_shape):
        width = input_shape[-1]
        dtype = self.dtype_policy

        # === Layers ===
        self.attention_norm = LayerNorm(epsilon=1e-6, dtype=dtype, name="attention_norm")
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=width // self.num_heads,
            dtype=dtype,
            name="attention",
        )
        self.mlp_norm = LayerNorm(epsilon=1e-6, dtype=dtype, name="mlp_norm")
        self.mlp_in = keras.layers.Dense(
            self.mlp_dim, activation=_gelu_tanh, dtype=dtype, name="mlp_in"
        )
        self.mlp_out = keras.layers.Dense(width, dtype=dtype, name="mlp_out")

        shape = (None, None, width)
        self.attention_norm.build(shape)
        self.attention.build(shape, shape)
        self.mlp_norm.build(shape)
        self.mlp_in.build(shape)
        self.mlp_out.build((None, None, self.mlp_dim))
        self.built = True

    def call(self, x):
        return self.run_forward(x)

    def forward(self, x):
        # The residual stream runs as (B * T, D) rows (only the attention sees
        # (B, T, D)): the same math, but its gradient compiles to fewer and
        # cheaper transposing fusions on CPU (~10% of a π0 training step).
        _, length, width = ops.shape(x)
        x = ops.reshape(x, (-1, width))
        h = ops.reshape(self.attention_norm(x), (-1, length, width))
        x = x + ops.reshape(self.attention(h, h), (-1, width))
        x = x + self.mlp_out(self.mlp_in(self.mlp_norm(x)))
        return ops.reshape(x, (-1, length, width))

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "mlp_dim": self.mlp_dim,
        }


@keras.saving.register_keras_serializable(package="keras_openpi")
class SigLIPEncoder(keras.layers.Layer):
    """SigLIP ViT: patch embedding, learned positions, blocks, final norm, head.

    Any size: So400m/14 (openpi's) is width 1152, depth 27, mlp_dim 4304,
    16 heads, patch 14; see `keras_openpi.models.variants.SIGLIP_VARIANTS`.
    The patch embedding and position embedding run in float32, the blocks in
    the layer's compute dtype. No pooling: one output token per patch.

    Why not keras-hub's `PaliGemmaVit` (keras-hub 0.32): in float32 both
    compute openpi's SigLIP (tanh GELU, epsilon 1e-6, row-major patches,
    learned positions, no pooling head): keras-hub's tower is within 3.2e-6
    of openpi's encodings on the fixture, and the two layers are 4.8e-7
    apart on a random tower whose outputs reach 3.3
    (`tests/test_keras_hub_paligemma.py`; the weights map one to one,
    `keras_openpi.models.paligemma_weights`). In mixed bfloat16, openpi's
    precision, keras-hub embeds patches and positions and computes the
    attention logits and softmax in bfloat16, where openpi and this layer
    keep them in float32 (float32 embeddings here, and Keras'
    `dot_product_attention`, whose softmax is float32 on JAX): 0.016 apart
    on the same tower, two bfloat16 steps at that scale. `PaliGemmaVit` is
    also a functional model of square images of one size (π0 takes any
    `(height, width)`), its position table is an `Embedding` layer that
    `Model.quantize("int8")` quantizes (openpi keeps it float), and its
    weight paths (`image_encoder/...`, flattened (D, N * H) projections)
    differ from the per-head ones that LoRA targets, freezing patterns and
    the openpi and LeRobot weight maps address.

    Args:
        width: model width.
        depth: number of blocks.
        mlp_dim: MLP inner width.
        num_heads: attention heads.
        patch_size: square patch side in pixels.
        image_size: `(height, width)` in pixels, multiples of `patch_size`.
        output_dim: width of the `head` projection applied to every token
            (the language model's width).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        images: (B, height, width, 3) float images in [-1, 1].

    Returns:
        (B, P, output_dim), P = number of patches.

    Example:
    >>> encoder = SigLIPEncoder(width=64, depth=2, mlp_dim=128, num_heads=4,
    ...                         patch_size=16, image_size=(64, 64), output_dim=32)
    >>> encoder(keras.ops.zeros((2, 64, 64, 3))).shape
    (2, 16, 32)
    """

    def __init__(
        self,
        width,
        depth,
        mlp_dim,
        num_heads,
        patch_size,
        image_size=(224, 224),
        output_dim=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.width = width
        self.depth = depth
        self.mlp_dim = mlp_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.image_size = tuple(image_size)
        self.output_dim = output_dim or width
        for side in self.image_size:
            if side % patch_size:
                raise ValueError(
                    f"image_size {self.image_size} must be a multiple of "
                    f"patch_size {patch_size}."
                )
        self.num_patches = (self.image_size[0] // patch_size) * (
            self.image_size[1] // patch_size
        )

        # === Layers ===
        dtype = self.dtype_policy
        self.patch_embedding = keras.layers.Conv2D(
            width,
            patch_size,
            strides=patch_size,
            padding="valid",
            dtype="float32",
            name="patch_embedding",
        )
        self.blocks = [
            SigLIPBlock(num_heads, mlp_dim, dtype=dtype, name=f"encoder_block_{i}")
            for i in range(depth)
        ]
        self.encoder_norm = LayerNorm(
            epsilon=1e-6, dtype=dtype, name="encoder_norm"
        )
        self.head = keras.layers.Dense(self.output_dim, dtype=dtype, name="head")

    def build(self, input_shape=None):
        self.patch_embedding.build((None, *self.image_size, 3))
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(1, self.num_patches, self.width),
            initializer=keras.initializers.RandomNormal(stddev=self.width**-0.5),
            dtype="float32",
        )
        shape = (None, self.num_patches, self.width)
        for block in self.blocks:
            block.build(shape)
        self.encoder_norm.build(shape)
        self.head.build(shape)
        self.built = True

    def encode(self, images):
        """(B, h, w, 3) -> (B, P, width): the tokens before the `head` projection."""
        x = self.patch_embedding(ops.cast(images, "float32"))
        x = ops.reshape(x, (-1, self.num_patches, self.width))
        x = ops.cast(ops.add(x, self.position_embedding), self.compute_dtype)
        for block in self.blocks:
            x = block(x)
        return self.encoder_norm(x)

    def call(self, images):
        return self.head(self.encode(images))

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "depth": self.depth,
            "mlp_dim": self.mlp_dim,
            "num_heads": self.num_heads,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "output_dim": self.output_dim,
        }
