"""The building blocks against small numpy references."""

import keras
import numpy as np
import pytest

from keras_openpi import layers as L


def test_rms_norm_float32_and_scale():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    norm = L.RMSNorm()
    norm.build(x.shape)
    norm.scale.assign(np.full((8,), 0.5, "float32"))
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * 1.5
    np.testing.assert_allclose(np.asarray(norm(x)), expected, rtol=1e-5, atol=1e-6)
    half = L.RMSNorm(dtype="bfloat16")
    half.build(x.shape)
    out = half(keras.ops.cast(x, "bfloat16"))
    assert out.dtype == "bfloat16"
    np.testing.assert_allclose(np.asarray(out, "float32"), expected / 1.5, atol=3e-2)


def test_adaptive_rms_norm_starts_as_zero_gate():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    norm = L.AdaptiveRMSNorm(cond_dim=4)
    y, gate = norm(x, np.ones((2, 4), "float32"))
    np.testing.assert_allclose(np.asarray(gate), 0.0)
    np.testing.assert_allclose(
        np.asarray(y), x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6), rtol=1e-5
    )
    norm.modulation.bias.assign(np.concatenate([np.full(8, 1.0), np.full(8, 2.0), np.full(8, 3.0)]).astype("float32"))
    y, gate = norm(x, np.zeros((2, 4), "float32"))
    normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(y), normed * 2 + 2, rtol=1e-5, atol=1e-5)
    assert gate.shape == (2, 1, 8) and np.allclose(np.asarray(gate), 3.0)


def test_rotary_is_split_half_and_relative():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 1, 1, 8)).astype("float32")
    k = rng.normal(size=(1, 1, 1, 8)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(L.apply_rotary_embedding(q, np.zeros((1, 1), "int32"))), q, atol=1e-7
    )
    # Position 1, first frequency (1.0): (x0, x4) rotate by 1 radian.
    rotated = np.asarray(L.apply_rotary_embedding(q, np.ones((1, 1), "int32")))[0, 0, 0]
    c, s = np.cos(1.0), np.sin(1.0)
    x = q[0, 0, 0]
    np.testing.assert_allclose(rotated[[0, 4]], [x[0] * c - x[4] * s, x[4] * c + x[0] * s], rtol=1e-5)

    def score(pq, pk):
        rq = np.asarray(L.apply_rotary_embedding(q, np.full((1, 1), pq, "int32")))
        rk = np.asarray(L.apply_rotary_embedding(k, np.full((1, 1), pk, "int32")))
        return float((rq * rk).sum())

    assert score(7, 3) == pytest.approx(score(14, 10), rel=1e-4)


def test_attention_mask_examples():
    mask = np.asarray(L.make_attention_mask(np.ones((1, 5), bool), np.array([0, 0, 1, 1, 0])))
    expected = np.array(
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
        bool,
    )
    np.testing.assert_array_equal(mask[0], expected)
    padded = np.asarray(L.make_attention_mask(np.array([[1, 1, 0]], bool), np.zeros(3)))
    np.testing.assert_array_equal(padded[0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


def test_time_embedding_values():
    emb = np.asarray(L.sinusoidal_time_embedding(np.array([0.0, 0.5], "float32"), 8))
    period = 4e-3 * (4.0 / 4e-3) ** np.linspace(0, 1, 4)
    angle = 0.5 * 2 * np.pi / period
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(angle), np.cos(angle)]), atol=2e-4)  # float32 angles up to ~785 rad
    with pytest.raises(ValueError, match="must be even"):
        L.sinusoidal_time_embedding(np.zeros(1), 7)


def _reference_attention(q, k, v, mask):
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    qr = q.reshape(b, t, kv, g, h)
    logits = np.einsum("btkgh,bskh->bkgts", qr, k)
    logits = np.where(mask[:, None, None], logits, -2.3819763e38)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def test_joint_attention_gqa_and_fully_masked_rows():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4, 8)).astype("float32")
    k = rng.normal(size=(2, 6, 2, 8)).astype("float32")
    v = rng.normal(size=(2, 6, 2, 8)).astype("float32")
    mask = rng.uniform(size=(2, 5, 6)) > 0.4
    mask[0, 2] = False  # a fully masked query row
    out = np.asarray(L.joint_attention(q, k, v, mask))
    np.testing.assert_allclose(out, _reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    # Uniform attention for the masked row: finite, the mean of the values.
    np.testing.assert_allclose(out[0, 2], np.repeat(v[0].mean(0), 2, axis=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        L.joint_attention(q[:, :, :3], k, v, mask)


def test_gated_feed_forward_is_gelu_tanh_gated():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    ffw = L.GatedFeedForward(hidden_dim=16)
    out = np.asarray(ffw(x))
    gate, up, down = (np.asarray(w) for w in (ffw.gate.kernel, ffw.up.kernel, ffw.down.kernel))
    a = x @ gate
    gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    np.testing.assert_allclose(out, (gelu * (x @ up)) @ down, rtol=1e-4, atol=1e-5)


def test_decoder_block_skips_missing_experts_and_uses_cache():
    block = L.DecoderBlock(
        experts=[{"name": "vlm", "width": 16, "mlp_dim": 32}, {"name": "action_expert", "width": 8, "mlp_dim": 16}],
        num_query_heads=2, num_key_value_heads=1, head_dim=4,
    )
    block.build()
    rng = np.random.default_rng(0)
    prefix = rng.normal(size=(1, 3, 16)).astype("float32")
    suffix = rng.normal(size=(1, 2, 8)).astype("float32")
    full_mask = np.ones((1, 5, 5), bool)
    full_mask[:, :3, 3:] = False  # the prefix does not see the suffix
    (p_out, s_out), _ = block([prefix, suffix], np.arange(5)[None], full_mask)
    (p_only, none), cache = block([prefix, None], np.arange(3)[None], full_mask[:, :3, :3])
    assert none is None and cache[0].shape == (1, 3, 1, 4)
    (none, s_cached), _ = block([None, suffix], np.arange(3, 5)[None], full_mask[:, 3:], kv_cache=cache)
    np.testing.assert_allclose(np.asarray(p_only), np.asarray(p_out), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s_cached), np.asarray(s_out), atol=1e-5)
    names = sorted({"/".join(v.path.split("/")[1:3]) for v in block.weights})
    assert names == ["action_expert/attention", "action_expert/feed_forward",
                     "action_expert/pre_attention_norm", "action_expert/pre_feed_forward_norm",
                     "vlm/attention", "vlm/feed_forward", "vlm/pre_attention_norm",
                     "vlm/pre_feed_forward_norm"]


def test_siglip_encoder_shapes_and_variants():
    from keras_openpi.models.variants import resolve_siglip_variant

    assert resolve_siglip_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14)
    encoder = L.SigLIPEncoder(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, image_size=(32, 48), output_dim=16)
    out = encoder(np.zeros((2, 32, 48, 3), "float32"))
    assert out.shape == (2, 4 * 6, 16)
    assert encoder.position_embedding.shape == (1, 24, 32)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        L.SigLIPEncoder(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=(32, 32))


@pytest.mark.parametrize("layer", [
    L.RMSNorm(), L.AdaptiveRMSNorm(cond_dim=3), L.GatedFeedForward(hidden_dim=8),
    L.GemmaAttention(num_query_heads=2, num_key_value_heads=1, head_dim=4),
    L.SigLIPBlock(num_heads=2, mlp_dim=8),
])
def test_layer_configs_round_trip(layer):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
