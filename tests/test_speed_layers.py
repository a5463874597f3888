"""The CPU-speed rewrites keep the math: joint attention, LayerNorm, retain_freed_memory."""

import platform
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_openpi.layers import LayerNorm
from keras_openpi.layers import joint_attention
from keras_openpi.layers.attention import MASK_FILL_VALUE


def reference_attention(q, k, v, mask):
    """Per-head softmax attention in float64 numpy, kv head = query head // groups."""
    heads = q.shape[2]
    groups = heads // k.shape[2]
    out = np.zeros(q.shape)
    for n in range(heads):
        logits = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, n // groups]).astype(np.float64)
        logits = np.where(mask, logits, MASK_FILL_VALUE)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, n] = np.einsum("bts,bsh->bth", probs, v[:, :, n // groups])
    return out


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_joint_attention_matches_per_head_reference(num_kv_heads):
    rng = np.random.default_rng(0)
    batch, length, keys_length, heads, head_dim = 2, 5, 7, 4, 8
    q = rng.normal(size=(batch, length, heads, head_dim)).astype("float32")
    k = rng.normal(size=(batch, keys_length, num_kv_heads, head_dim)).astype("float32")
    v = rng.normal(size=(batch, keys_length, num_kv_heads, head_dim)).astype("float32")
    mask = rng.uniform(size=(batch, length, keys_length)) < 0.7
    mask[0, 1] = False  # a fully masked query row attends uniformly, as in openpi
    out = np.asarray(joint_attention(q, k, v, mask))
    assert out.shape == (batch, length, heads, head_dim)
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-5, rtol=0)
    groups = heads // num_kv_heads
    uniform = v[0].mean(axis=0)[np.arange(heads) // groups]  # (N, H): mean value per head
    np.testing.assert_allclose(out[0, 1], uniform, atol=1e-5, rtol=0)


def test_joint_attention_rejects_heads_not_multiple_of_kv_heads():
    q = np.zeros((1, 2, 3, 4), "float32")
    kv = np.zeros((1, 2, 2, 4), "float32")
    with pytest.raises(ValueError, match=r"num_query_heads \(3\) must be a multiple"):
        joint_attention(q, kv, kv, np.ones((1, 2, 2), bool))


def test_layer_norm_matches_keras_layer_normalization():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(3, 7, 16)) * 3 + 2).astype("float32")
    ours, keras_norm = LayerNorm(epsilon=1e-6), keras.layers.LayerNormalization(epsilon=1e-6)
    ours.build(x.shape)
    keras_norm.build(x.shape)
    weights = [rng.normal(size=(16,)).astype("float32") for _ in range(2)]
    ours.set_weights(weights)
    keras_norm.set_weights(weights)
    assert [w.path for w in ours.weights] == ["layer_norm/gamma", "layer_norm/beta"]
    np.testing.assert_allclose(
        np.asarray(ours(x)), np.asarray(keras_norm(x)), atol=2e-5, rtol=0
    )
    restored = LayerNorm.from_config(ours.get_config())
    assert restored.epsilon == 1e-6 and restored.axis == [-1]


def test_layer_norm_rejects_other_axes():
    with pytest.raises(ValueError, match="normalizes the last axis.*axis=1"):
        LayerNorm(axis=1)


def test_retain_freed_memory_applies_on_glibc():
    code = "from keras_openpi.backend import retain_freed_memory; print(retain_freed_memory())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert result.stdout.strip().splitlines()[-1] == str(expected)
