"""keras-hub's PaliGemma against π0's layers: SigLIP tower, π0 and π0-FAST from a backbone."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_openpi.convert import load_paligemma_weights
from keras_openpi.convert import pi0_config_from_paligemma
from keras_openpi.convert import pi0_from_paligemma
from keras_openpi.convert import pi0_from_openpi
from keras_openpi.layers.masks import make_attention_mask
from keras_openpi.layers.siglip import SigLIPEncoder
from keras_openpi.models import Pi0
from keras_openpi.models import Pi0Fast
from keras_openpi.models.paligemma_weights import language_weight_pairs
from keras_openpi.models.paligemma_weights import vision_weight_pairs

keras_hub = pytest.importorskip("keras_hub")
from keras_hub.src.models.pali_gemma.pali_gemma_vit import PaliGemmaVit  # noqa: E402

BACKBONE = dict(
    vocabulary_size=96,
    image_size=28,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=1,
    hidden_dim=32,
    intermediate_dim=64,
    head_dim=8,
    vit_patch_size=14,
    vit_num_heads=2,
    vit_hidden_dim=16,
    vit_num_layers=2,
    vit_intermediate_dim=32,
)
EXPERT = dict(width=16, depth=2, mlp_dim=32, num_heads=4, num_kv_heads=1, head_dim=8)
BATCH, LENGTH, PATCHES = 2, 8, 4


def randomize(layer, seed, scale=0.2):
    """Every weight drawn from N(0, scale): norm scales, biases and positions are non-trivial."""
    rng = np.random.default_rng(seed)
    for variable in layer.weights:
        variable.assign(rng.normal(0.0, scale, variable.shape).astype(variable.dtype))


@pytest.fixture(scope="module")
def backbone():
    model = keras_hub.models.PaliGemmaBackbone(**BACKBONE)
    randomize(model, seed=0)
    return model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    images = rng.uniform(-1.0, 1.0, (BATCH, 28, 28, 3)).astype("float32")
    tokens = rng.integers(4, BACKBONE["vocabulary_size"], (BATCH, LENGTH)).astype("int32")
    mask = np.arange(LENGTH)[None] < np.array([[LENGTH], [5]])  # the second prompt is padded
    return images, tokens, mask


def paligemma_hidden_states(backbone, images, tokens, mask, response_mask=None):
    response_mask = np.zeros_like(tokens) if response_mask is None else response_mask
    outputs = backbone(
        {
            "images": images,
            "token_ids": tokens,
            "padding_mask": mask.astype("int32"),
            "response_mask": response_mask.astype("int32"),
        }
    )
    return ops.convert_to_numpy(outputs)


def valid(hidden, mask):
    """The hidden states of the image tokens and the unpadded prompt tokens, (n, D)."""
    keep = np.concatenate([np.ones((BATCH, PATCHES), bool), mask], axis=1)
    return np.asarray(hidden)[keep]


# === The SigLIP tower ===


def test_keras_hub_vit_computes_openpis_siglip(openpi_fixture):
    """openpi's SigLIP weights in a keras-hub PaliGemmaVit give openpi's encodings."""
    fixture = openpi_fixture("pi0")
    model = pi0_from_openpi(fixture.path, action_horizon=10, max_token_len=16)
    encoder = model.vision_encoder
    vit = PaliGemmaVit(
        image_size=224,
        patch_size=encoder.patch_size,
        num_heads=encoder.num_heads,
        hidden_dim=encoder.width,
        num_layers=encoder.depth,
        intermediate_dim=encoder.mlp_dim,
        num_classes=encoder.output_dim,
    )
    pairs = vision_weight_pairs(vit, encoder)
    assert len(pairs) == len(vit.weights) == len(encoder.weights) == 7 + 2 * 16
    for _, hub, ours, _ in pairs:  # π0 → keras-hub: the inverse reshapes
        hub.assign(np.asarray(ours).reshape(hub.shape))
    obs = model.prepare_observation(fixture.observation(model.image_keys))
    for key, image in zip(model.image_keys, obs["images"]):
        before_head = ops.convert_to_numpy(vit.get_layer("image_encoder")(image))
        np.testing.assert_allclose(
            before_head, fixture[f"output/image_encoded/{key}"], atol=1e-4, rtol=0
        )
        ours = ops.convert_to_numpy(encoder.encode(image))
        assert np.abs(before_head - ours).max() < 1e-5
        tokens = ops.convert_to_numpy(vit(image))
        assert tokens.shape == (2, 196, 64)
        assert np.abs(tokens - ops.convert_to_numpy(encoder(image))).max() < 1e-5


def tiny_pair(dtype):
    vit = PaliGemmaVit(
        image_size=28, patch_size=7, num_heads=4, hidden_dim=32, num_layers=2,
        intermediate_dim=64, num_classes=24, dtype=dtype,
    )  # fmt: skip
    randomize(vit, seed=2, scale=0.3)
    encoder = SigLIPEncoder(
        width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=7, image_size=(28, 28),
        output_dim=24, dtype=dtype,
    )  # fmt: skip
    encoder.build()
    for _, hub, ours, transform in vision_weight_pairs(vit, encoder):
        ours.assign(transform(np.asarray(hub)))
    return vit, encoder


def test_vit_and_siglip_differ_in_bfloat16_rounding_only():
    images = np.random.default_rng(3).uniform(-1, 1, (3, 28, 28, 3)).astype("float32")
    vit, encoder = tiny_pair("float32")
    hub = ops.convert_to_numpy(vit(images))
    assert np.abs(hub - ops.convert_to_numpy(encoder(images))).max() < 1e-6 * np.abs(hub).max()

    vit, encoder = tiny_pair("mixed_bfloat16")
    # keras-hub embeds patches and positions in the compute dtype; π0, as
    # openpi, in float32 (then the blocks run in bfloat16).
    embedded = vit.get_layer("image_encoder").vision_embeddings(images)
    assert embedded.dtype == "bfloat16"
    assert encoder.patch_embedding.compute_dtype == "float32"
    assert encoder.position_embedding.dtype == "float32"
    hub = ops.convert_to_numpy(ops.cast(vit(images), "float32"))
    ours = ops.convert_to_numpy(ops.cast(encoder(images), "float32"))
    error = np.abs(hub - ours).max()
    # A few bfloat16 steps (2^-8 relative) at the outputs' scale, not more.
    assert 0 < error <= 4 * 2.0**-8 * np.abs(hub).max()


# === π0 and π0-FAST from a PaliGemmaBackbone ===


def test_pi0_config_from_paligemma(backbone):
    assert pi0_config_from_paligemma(backbone) == dict(
        # keras-hub's intermediate_dim counts both halves of the gated feed-forward.
        paligemma_variant=dict(
            width=32, depth=2, mlp_dim=32, num_heads=4, num_kv_heads=1, head_dim=8
        ),
        vision_variant=dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=14),
        vocabulary_size=96,
        image_resolution=(28, 28),
    )


def pi0_prefix_hidden_states(model, images, tokens, mask):
    """π0's prefix (image + prompt) through its VLM expert, as `sample_actions` runs it."""
    observation = {
        "image": {"base_0_rgb": images},
        "state": np.zeros((BATCH, model.action_dim), "float32"),
        "tokenized_prompt": tokens,
        "tokenized_prompt_mask": mask,
    }
    prefix, prefix_mask, prefix_ar = model.embed_prefix(model.prepare_observation(observation))
    positions = ops.cumsum(ops.cast(prefix_mask, "int32"), axis=1) - 1
    attention = make_attention_mask(prefix_mask, prefix_ar)
    (hidden, _), _ = model.gemma([prefix, None], positions, attention)
    return ops.convert_to_numpy(hidden)


def test_pi0_prefix_hidden_states_equal_paligemmas(backbone, inputs):
    images, tokens, mask = inputs
    model = Pi0(
        **pi0_config_from_paligemma(backbone),
        action_expert_variant=EXPERT,
        action_dim=4,
        action_horizon=3,
        max_token_len=LENGTH,
        image_keys=("base_0_rgb",),
        seed=0,
    )
    vlm_paths = {
        v.path for v in [*model.vision_encoder.weights, *model.gemma.token_embedding.weights]
    }
    vlm_paths |= {v.path for b in model.gemma.decoder_blocks for v in b.experts[0].weights}
    vlm_paths |= {v.path for v in model.gemma.final_norms[0].weights}
    before = {v.path: np.array(v) for v in model.weights}
    load_paligemma_weights(model, backbone)

    expected = paligemma_hidden_states(backbone, images, tokens, mask)
    hidden = pi0_prefix_hidden_states(model, images, tokens, mask)
    assert hidden.shape == expected.shape == (BATCH, PATCHES + LENGTH, 32)
    assert np.abs(valid(hidden, mask) - valid(expected, mask)).max() < 1e-5
    assert np.abs(expected).max() > 1.0  # not vanishing activations
    # Only the VLM and vision weights changed; the action expert and the
    # projections are as initialized.
    changed = {v.path for v in model.weights if not np.array_equal(before[v.path], np.array(v))}
    assert changed == vlm_paths
    assert len(changed) == 2 + 2 * 9 + (7 + 2 * 16)


def test_pi0_from_paligemma_builds_pi05_from_a_preset(backbone, inputs, tmp_path):
    """`Pi0.from_paligemma` reads a PaliGemma preset through keras-hub's loader."""
    images, tokens, mask = inputs
    backbone.save_to_preset(str(tmp_path / "paligemma"))
    model = Pi0.from_paligemma(
        tmp_path / "paligemma",
        action_expert_variant=EXPERT,
        action_dim=4,
        action_horizon=3,
        max_token_len=LENGTH,
        pi05=True,
        image_keys=("base_0_rgb",),
    )
    assert model.pi05 and model.vocabulary_size == 96 and model.expert_width == 16
    hidden = pi0_prefix_hidden_states(model, images, tokens, mask)
    expected = paligemma_hidden_states(backbone, images, tokens, mask)
    assert np.abs(valid(hidden, mask) - valid(expected, mask)).max() < 1e-5
    actions = model.sample_actions(model.dummy_observation(BATCH), num_steps=2)
    assert actions.shape == (BATCH, 3, 4)
    with pytest.raises(
        ValueError,
        match=r"\['vocabulary_size'\] come from the PaliGemma backbone; do not pass them to "
        r"Pi0.from_paligemma",
    ):
        Pi0.from_paligemma(backbone, action_expert_variant=EXPERT, vocabulary_size=10)
    # The function of `keras_openpi.convert` is the same conversion.
    again = pi0_from_paligemma(
        backbone,
        action_expert_variant=EXPERT,
        action_dim=4,
        action_horizon=3,
        max_token_len=LENGTH,
        pi05=True,
        image_keys=("base_0_rgb",),
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(again.gemma.token_embedding.embeddings),
        ops.convert_to_numpy(model.gemma.token_embedding.embeddings),
    )


def test_pi0_fast_from_paligemma_is_paligemma(backbone, inputs):
    """π0-FAST is PaliGemma: prefix-LM hidden states and tied logits equal the backbone's."""
    images, tokens, mask = inputs
    model = Pi0Fast.from_paligemma(
        backbone, action_dim=4, action_horizon=3, max_token_len=LENGTH, image_keys=("base_0_rgb",)
    )
    pairs = vision_weight_pairs(backbone.vit_encoder, model.vision_encoder)
    pairs += language_weight_pairs(backbone, model.gemma)
    assert {id(target) for _, _, target, _ in pairs} == {id(v) for v in model.weights}  # all copied
    ar = (np.arange(LENGTH)[None] >= 3).astype("int32") * mask  # prompt 3 tokens, then answer
    observation = {
        "image": {"base_0_rgb": images},
        "tokenized_prompt": tokens,
        "tokenized_prompt_mask": mask,
        "token_ar_mask": ar,
    }
    embedded, input_mask, ar_mask = model.embed_prefix(model.prepare_observation(observation))
    positions = ops.cumsum(ops.cast(input_mask, "int32"), axis=1) - 1
    attention = make_attention_mask(input_mask, ar_mask)
    (hidden,), _ = model.gemma([embedded], positions, attention)
    expected = paligemma_hidden_states(backbone, images, tokens, mask, response_mask=ar)
    assert np.abs(valid(hidden, mask) - valid(expected, mask)).max() < 1e-5
    logits = ops.convert_to_numpy(model.gemma.decode_logits(hidden))
    hub_logits = ops.convert_to_numpy(backbone.token_embedding(expected, reverse=True))
    assert np.abs(valid(logits, mask) - valid(hub_logits, mask)).max() < 1e-4


def test_unsupported_backbones_and_shapes_are_refused(backbone):
    gemma2 = keras_hub.models.PaliGemmaBackbone(**BACKBONE, use_post_ffw_norm=True)
    with pytest.raises(
        ValueError,
        match=r"the PaliGemmaBackbone has use_post_ffw_norm=True; π0's VLM computes "
        r"use_post_ffw_norm=False \(PaliGemma 1's architecture\)",
    ):
        pi0_config_from_paligemma(gemma2)
    config = pi0_config_from_paligemma(backbone)
    model = Pi0(
        **{**config, "vocabulary_size": 90},
        action_expert_variant=EXPERT,
        action_dim=4,
        action_horizon=3,
        max_token_len=LENGTH,
        image_keys=("base_0_rgb",),
    )
    before = [np.array(v) for v in model.weights]
    with pytest.raises(
        ValueError,
        match=r"PaliGemma weight gemma/token_embedding has shape \(96, 32\), but π0's "
        r"pi0/gemma/token_embedding/embeddings has shape \(90, 32\); build the model with "
        r"pi0_config_from_paligemma\(backbone\)",
    ):
        load_paligemma_weights(model, backbone)
    assert all(np.array_equal(a, np.array(v)) for a, v in zip(before, model.weights))
    with pytest.raises(ValueError, match="'backbone' must be a keras_hub.models.PaliGemmaBackbone"):
        load_paligemma_weights(model, keras.layers.Dense(2))
