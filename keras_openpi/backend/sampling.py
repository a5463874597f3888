"""Drawing token ids from logits inside a compiled decoding loop."""

import keras
from keras import ops


def step_seed(seed, step):
    """The seed of decoding step `step`: `seed + [0, step]`, as a `SeedGenerator` advances.

    Args:
        seed: a (2,) seed tensor (the state a `keras.random.SeedGenerator`
            returns from `next()`).
        step: a scalar int, possibly traced.
    """
    return seed + ops.cast(ops.stack([ops.zeros_like(step), step]), seed.dtype)


def sample_categorical(logits, seed):
    """One id per row of (B, V) logits, drawn with a (2,) seed tensor.

    On JAX the seed tensor is the random key and on TensorFlow the seed of a
    stateless draw, so the draw can live in a compiled loop. PyTorch runs
    the draw eagerly with an int seed made from the tensor's value.

    Returns:
        (B,) int32 ids.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        seed = tf.cast(tf.math.floormod(tf.cast(seed, "int64"), 2**31 - 1), "int32")
        return tf.cast(tf.random.stateless_categorical(logits, 1, seed=seed)[:, 0], "int32")
    if backend != "jax":
        high, low = (int(v) for v in ops.convert_to_numpy(seed))
        seed = (high * 1_000_003 + low) % (2**31 - 1)
    return ops.cast(keras.random.categorical(logits, 1, seed=seed)[:, 0], "int32")
