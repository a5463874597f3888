"""Pi0Fast's Keras API on a tiny model: decoding, fit, LoRA, .keras files, the data chain, errors."""

import keras
import numpy as np
import pytest
from keras import ops

from finetuning_helpers import snapshot
from keras_openpi.data.pipeline import model_transforms
from keras_openpi.data.transforms import ExtractFASTActions
from keras_openpi.data.transforms import TokenizeFASTInputs
from keras_openpi.data.transforms import compose
from keras_openpi.finetuning import shapes_only
from keras_openpi.layers import GemmaMixture
from keras_openpi.models import Pi0Fast
from keras_openpi.models.fast_decoding import decode_step_mask
from keras_openpi.models.fast_decoding import left_to_right_align
from keras_openpi.tokenizers import FASTPromptTokenizer
from keras_openpi.tokenizers import FASTTokenizer
from test_fast_prompt import NUM_LOC
from test_fast_prompt import train_sentencepiece

GEMMA = dict(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
VISION = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16)
HORIZON, DIM, LENGTH = 4, 3, 56
STATE = np.array([0.1, -0.5, 0.9], np.float32)
PROMPTS = ["pick up the cup", "put the towel in the basket", "open the drawer", "close it"]
TOKEN_KEYS = ("tokenized_prompt", "tokenized_prompt_mask", "token_ar_mask", "token_loss_mask")


def tiny_fast(vocabulary_size=768, **overrides):
    kwargs = dict(
        paligemma_variant=GEMMA,
        vision_variant=VISION,
        vocabulary_size=vocabulary_size,
        action_dim=DIM,
        action_horizon=HORIZON,
        max_token_len=LENGTH,
        image_resolution=(32, 32),
        seed=0,
    )
    kwargs.update(overrides)
    return Pi0Fast(**kwargs)


def random_observation(model, batch=2, seed=0, prompt_length=10):
    """Random images and tokens; a bidirectional prefix of 4 tokens then a causal postfix."""
    rng = np.random.default_rng(seed)
    h, w = model.image_resolution
    length = model.max_token_len
    valid = np.arange(length) < prompt_length
    return {
        "image": {
            k: rng.uniform(-1, 1, (batch, h, w, 3)).astype("float32") for k in model.image_keys
        },
        "image_mask": {k: np.ones((batch,), bool) for k in model.image_keys},
        "tokenized_prompt": rng.integers(2, model.vocabulary_size, (batch, length)).astype("int32"),
        "tokenized_prompt_mask": np.broadcast_to(valid, (batch, length)).copy(),
        "token_ar_mask": np.broadcast_to(valid & (np.arange(length) >= 4), (batch, length)).astype(
            "int32"
        ),
        "token_loss_mask": np.broadcast_to(
            valid & (np.arange(length) >= 4), (batch, length)
        ).copy(),
    }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny PaliGemma-like SentencePiece model (768 ids) and a FAST tokenizer fitted on random walks."""
    path = tmp_path_factory.mktemp("fast") / "tiny_paligemma.model"
    path.write_bytes(train_sentencepiece(with_locations=True))
    rng = np.random.default_rng(1)
    chunks = rng.uniform(-0.5, 0.5, (200, 1, DIM)) + np.cumsum(
        rng.normal(0.0, 0.04, (200, HORIZON, DIM)), axis=1
    )
    fast = FASTTokenizer(vocab_size=NUM_LOC).fit(chunks)
    return FASTPromptTokenizer(path, fast, max_len=LENGTH), chunks[1]


@pytest.fixture(scope="module")
def model():
    # No EOS: greedy decoding then never stops early (random weights could emit it first).
    return tiny_fast(eos_token_id=-1)


def test_left_to_right_align_and_decode_mask():
    tokens = ops.reshape(ops.arange(12, dtype="float32"), (2, 6, 1))
    input_mask = np.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    attention = np.arange(72).reshape(2, 6, 6) % 3 == 0
    rolled, mask, rolled_attention = left_to_right_align(tokens, input_mask, attention)
    # The first row is rolled by -(3 + 1), the second (all valid) by -6: unchanged.
    assert np.asarray(rolled)[..., 0].tolist() == [[4, 5, 0, 1, 2, 3], [6, 7, 8, 9, 10, 11]]
    assert np.asarray(mask).astype(int).tolist() == [[0, 0, 1, 1, 0, 1], [1] * 6]
    np.testing.assert_array_equal(
        np.asarray(rolled_attention)[0], np.roll(attention[0], -4, axis=(0, 1))
    )
    np.testing.assert_array_equal(np.asarray(rolled_attention)[1], attention[1])
    step = np.asarray(decode_step_mask(np.array([2, 0], "int32"), 7, 9))
    assert step.shape == (2, 1, 9)
    assert step[:, 0].astype(int).tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 0], [1] * 7 + [0, 0]]


def test_preallocated_cache_matches_one_causal_forward():
    """Prefill at slot 0 then one token at slot 4 equals a causal forward of all 5 tokens."""
    gemma = GemmaMixture(
        [{"name": "vlm", "width": 32, "mlp_dim": 64}],
        depth=2,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocabulary_size=50,
    )
    gemma.build()
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype("float32")
    positions = np.broadcast_to(np.arange(5, dtype="int32"), (2, 5))
    causal = np.broadcast_to(np.tril(np.ones((5, 5), bool)), (2, 5, 5))
    (full,), _ = gemma([x], positions, causal)
    cache = gemma.init_kv_cache(2, 5)
    (prefill,), cache = gemma(
        [x[:, :4]], positions[:, :4], causal[:, :4], kv_cache=cache, cache_index=0
    )
    (last,), cache = gemma(
        [x[:, 4:]],
        positions[:, 4:],
        causal[:, 4:],
        kv_cache=cache,
        cache_index=ops.convert_to_tensor(4),
    )
    np.testing.assert_allclose(np.asarray(prefill), np.asarray(full)[:, :4], atol=1e-5)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full)[:, 4:], atol=1e-5)
    assert cache[0][0].shape == (2, 5, 1, 16)


def test_shapes_defaults_and_greedy_logits(model):
    assert model.name == "pi0_fast" and model.image_keys == (
        "base_0_rgb",
        "base_1_rgb",
        "wrist_0_rgb",
    )
    assert Pi0Fast("dummy", "tiny/16", vocabulary_size=8).max_token_len == 250
    observation = random_observation(model)
    assert model.token_loss(observation).shape == (2,)
    tokens, logits = model.generate(observation, max_decoding_steps=5, return_logits=True)
    assert tokens.shape == (2, 5) and tokens.dtype == "int32" and logits.shape == (2, 5, 768)
    # Greedy: each token is the argmax of the logits it was chosen from.
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(
        np.asarray(model.generate(observation, max_decoding_steps=5)), tokens
    )
    assert model.predict(observation, batch_size=2, verbose=0).shape == (2, 256)


def test_decoding_stops_once_every_sequence_has_emitted_eos(model):
    observation = random_observation(model, batch=1)
    observation = {  # two identical sequences, so that they emit EOS together
        key: {k: np.repeat(v, 2, axis=0) for k, v in value.items()}
        if isinstance(value, dict)
        else np.repeat(value, 2, axis=0)
        for key, value in observation.items()
    }
    free_tokens, free_logits = (
        np.asarray(a) for a in model.generate(observation, max_decoding_steps=6, return_logits=True)
    )
    eos = int(free_tokens[0, 2])
    first = int(np.argmax(free_tokens[0] == eos))
    stopping = Pi0Fast.from_config({**model.get_config(), "eos_token_id": eos})
    stopping.set_weights(model.get_weights())
    tokens, logits = (
        np.asarray(a)
        for a in stopping.generate(observation, max_decoding_steps=6, return_logits=True)
    )
    assert tokens[:, : first + 1].tolist() == free_tokens[:, : first + 1].tolist()
    assert (tokens[:, first + 1 :] == 0).all() and (logits[:, first + 1 :] == 0).all()
    np.testing.assert_array_equal(logits[:, : first + 1], free_logits[:, : first + 1])


def test_sampling_is_seeded(model):
    observation = random_observation(model)
    twin = tiny_fast(seed=0)
    twin.set_weights(model.get_weights())
    first = np.asarray(model.generate(observation, max_decoding_steps=6, temperature=2.0))
    assert (
        first.tolist()
        == np.asarray(twin.generate(observation, max_decoding_steps=6, temperature=2.0)).tolist()
    )
    assert ((first >= 0) & (first < 768)).all()
    again = np.asarray(model.generate(observation, max_decoding_steps=6, temperature=2.0))
    assert again.tolist() != first.tolist()  # the generator advanced


def test_fit_learns_a_chunk_that_sample_actions_decodes(tokenizer, tmp_path):
    """openpi's π0-FAST chain end to end: tokenize → fit → generate → extract the chunk.

    The tiny model learns one action chunk after four prompts of different
    lengths (so that it cannot rely on absolute positions: openpi decodes
    one position further than it trains); the batched decode then right-aligns
    four prefixes of different lengths. The model carries its tokenizer, also
    through a `.keras` file.
    """
    prompt_tokenizer, chunk = tokenizer
    chain = model_transforms(
        "pi0_fast",
        tokenizer=prompt_tokenizer,
        action_dim=DIM,
        action_horizon=HORIZON,
        image_size=(32, 32),
    )
    rng = np.random.default_rng(3)
    model = tiny_fast()
    images = {k: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in model.image_keys}
    samples = [
        compose(chain.inputs)({"image": images, "state": STATE, "prompt": p, "actions": chunk})
        for p in PROMPTS
    ]
    for prompt, sample in zip(PROMPTS, samples):
        expected = prompt_tokenizer.tokenize(prompt, STATE, chunk)
        for key, value in zip(TOKEN_KEYS, expected):
            np.testing.assert_array_equal(sample[key], value)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(stack(samples), epochs=150, batch_size=4, verbose=0).history
    assert set(history) == {"loss", "grad_norm", "learning_rate"}
    assert history["loss"][0] > 5.0 and history["loss"][-1] < 0.1

    inference = [
        compose(chain.inputs)({"image": images, "state": STATE, "prompt": p}) for p in PROMPTS
    ]
    assert not any(s["token_ar_mask"].any() or s["token_loss_mask"].any() for s in inference)
    observation = stack(inference)
    fast = prompt_tokenizer.fast_tokenizer
    decoded = fast.decode(fast.encode(chunk), HORIZON, DIM)
    tokens = np.asarray(model.generate(observation, max_decoding_steps=24))
    for row, sample in zip(tokens, samples):
        postfix = sample["tokenized_prompt"][sample["token_loss_mask"]]
        assert row[: len(postfix)].tolist() == postfix.tolist() and postfix[-1] == 1
        assert (row[len(postfix) :] == 0).all()  # nothing after EOS
        output = compose(chain.outputs)({"actions": row, "state": STATE})
        np.testing.assert_allclose(output["actions"], decoded, atol=1e-6)
    with pytest.raises(ValueError, match="carries no tokenizer"):
        model.sample_actions(observation, max_decoding_steps=24)
    model.set_tokenizer(prompt_tokenizer)
    actions = model.sample_actions(observation, max_decoding_steps=24)
    assert ops.is_tensor(actions) and actions.shape == (4, HORIZON, DIM) and actions.dtype == "float32"
    np.testing.assert_allclose(
        np.asarray(actions), np.broadcast_to(decoded, actions.shape), atol=1e-6
    )
    path = tmp_path / "fast_with_tokenizer.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.tokenizer.tokenizer.fast_tokenizer.get_config() == fast.get_config()
    np.testing.assert_array_equal(
        np.asarray(loaded.sample_actions(observation, max_decoding_steps=24)), np.asarray(actions)
    )


def stack(samples):
    """A batch of transformed samples: images and the four token arrays."""
    return {
        "image": {k: np.stack([s["image"][k] for s in samples]) for k in samples[0]["image"]},
        **{k: np.stack([s[k] for s in samples]) for k in TOKEN_KEYS},
    }


def test_lora_two_steps_freeze_the_gemma_and_train_the_rest(tmp_path):
    model = tiny_fast()
    model.enable_lora(rank=4)
    summary = model.trainable_summary()
    assert summary["vlm"]["trainable"] == 0 and summary["vision"]["frozen"] == 0
    # Per block (Keras' factorization, rank 4): query 2*32*4 + 4*16, key and value
    # 32*4 + 4*16 each, output 2*16*4 + 4*32, gate and up 32*4 + 4*64, down 64*4 + 4*32.
    assert summary["lora_adapters"]["trainable"] == 2 * (320 + 2 * 192 + 256 + 3 * 384)
    before = snapshot(model)
    frozen = sorted(path for path, (_, trainable) in before.items() if not trainable)
    assert "gemma/token_embedding/embeddings" in frozen and "gemma/vlm_final_norm/scale" in frozen
    assert not any(p.startswith("vision_encoder") or "lora" in p for p in frozen)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(
        random_observation(model, batch=4, seed=1), batch_size=2, epochs=1, shuffle=False, verbose=0
    )
    assert int(model.optimizer.iterations.numpy()) == 2
    after = snapshot(model)
    moved = {p: not np.array_equal(v, after[p][0]) for p, (v, _) in before.items()}
    assert [p for p in frozen if moved[p]] == []
    assert [p for p, (_, trainable) in before.items() if trainable and not moved[p]] == []

    observation = random_observation(model, seed=2)
    path = tmp_path / "lora.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.trainable_summary()["vlm"]["trainable"] == 0
    np.testing.assert_array_equal(
        np.asarray(loaded.token_loss(observation)), np.asarray(model.token_loss(observation))
    )


def test_keras_file_round_trip_is_identical(model, tmp_path):
    config = model.get_config()
    assert Pi0Fast.from_config(config).get_config() == config
    observation = random_observation(model, seed=4)
    path = tmp_path / "fast.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is Pi0Fast and [v.path for v in loaded.weights] == [
        v.path for v in model.weights
    ]
    assert loaded.tokenizer.tokenizer is None  # saved without one, reloaded without one
    np.testing.assert_array_equal(
        np.asarray(loaded.token_loss(observation)), np.asarray(model.token_loss(observation))
    )
    for a, b in zip(
        loaded.generate(observation, max_decoding_steps=4, return_logits=True),
        model.generate(observation, max_decoding_steps=4, return_logits=True),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_size_counts_and_openpi_freeze_filter():
    """openpi's π0-FAST: 2,923,335,408 params; gemma_2b_lora freezes 2,508,531,712 (reference 2.2)."""
    with shapes_only():
        model = Pi0Fast()
        lora = Pi0Fast()
        lora.apply_strategy("lora")
    assert model.count_params() == 2_923_335_408
    summary = lora.trainable_summary()
    assert summary["total"]["frozen"] == 2_508_531_712
    assert summary["vision"]["trainable"] == 414_803_696 and summary["vlm"]["trainable"] == 0
    assert lora.finetuning_state.lora == {"vlm": {"rank": 16, "alpha": 16.0}}
    assert lora.count_params() == 2_923_335_408 + summary["lora_adapters"]["trainable"]
    assert "other" not in summary
    with shapes_only():
        model.enable_lora(rank="openpi")
    assert model.trainable_summary()["total"]["frozen"] == 2_508_531_712
    with pytest.raises(
        ValueError, match="adapts \\['action_expert'\\], which Pi0Fast does not have"
    ):
        Pi0Fast.apply_strategy(tiny_fast(), "lora_action_expert")
    with pytest.raises(ValueError, match="freezes \\['vision', 'vlm'\\]: every weight of Pi0Fast"):
        tiny_fast().apply_strategy("action_expert_only")


def _without(key):
    def mutate(observation):
        observation.pop(key)

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_without("token_loss_mask"), "missing the key 'token_loss_mask'"),
        (_without("token_ar_mask"), "missing the key 'token_ar_mask'"),
        (lambda o: o["image"].pop("wrist_0_rgb"), "missing the key 'wrist_0_rgb'"),
        (
            lambda o: o.update(token_ar_mask=np.zeros((2, 5), "int32")),
            "'token_ar_mask' must have the shape of 'tokenized_prompt' \\(2, 56\\), got shape \\(2, 5\\)",
        ),
        (
            lambda o: o.update(tokenized_prompt=np.zeros((2, 57), "int32")),
            "'tokenized_prompt' must have shape \\(B, L\\) with L <= max_token_len = 56",
        ),
    ],
)
def test_bad_observations_name_the_key(model, mutate, message):
    observation = random_observation(model)
    mutate(observation)
    with pytest.raises(ValueError, match=message):
        model.token_loss(observation)


def test_bad_arguments_are_clear_errors(model, tokenizer):
    observation = random_observation(model)
    with pytest.raises(ValueError, match="'max_decoding_steps' must be at least 1, got 0"):
        model.generate(observation, max_decoding_steps=0)
    with pytest.raises(ValueError, match="'temperature' must be >= 0, got -1.0"):
        model.generate(observation, temperature=-1)
    with pytest.raises(ValueError, match="carries no tokenizer: pass tokenizer=FASTPromptTokenizer"):
        model.sample_actions(observation)
    with pytest.raises(ValueError, match="'tokenizer' must be a FASTPromptTokenizer, got str"):
        model.set_tokenizer("fast/")
    prompt_tokenizer, _ = tokenizer
    short = FASTPromptTokenizer(prompt_tokenizer.model_path, prompt_tokenizer.fast_tokenizer, max_len=10)
    with pytest.raises(ValueError, match="The tokenizer has max_len=10, the model expects 56"):
        model.set_tokenizer(short)
    with pytest.raises(ValueError, match="needs action_horizon"):
        model_transforms("pi0_fast", tokenizer=prompt_tokenizer, action_dim=DIM)
    with pytest.raises(ValueError, match="TokenizeFASTInputs: .* no 'state'"):
        TokenizeFASTInputs(prompt_tokenizer)({"prompt": PROMPTS[0]})
    with pytest.raises(
        ValueError, match="'actions' must hold one sequence .* got shape \\(2, 3\\)"
    ):
        ExtractFASTActions(prompt_tokenizer, HORIZON, DIM)({"actions": np.zeros((2, 3))})


def test_int8_logits_stay_close_to_float():
    """The tied embedding's int8 scale reaches the logits (`ReversibleEmbedding(reverse=True)`).

    Keras' abs-max int8 moves each weight by at most 1/254 of its channel's
    largest one, and (with `"int8"`) each activation of a token likewise; over
    this 2-block random model that is a measured 1.8-4.0 % RMS error of the
    first logits (3 seeds, both modes). The bound 10 % leaves room for other
    seeds; reading the int8 table without its scale (the bug this guards
    against) scales the logits by about 127 / max|w| ≈ 3000.
    """
    keras.utils.set_random_seed(0)
    model = tiny_fast(eos_token_id=-1)
    observation = random_observation(model, batch=4, seed=0)

    def first_logits(policy):
        _, logits = policy.generate(observation, max_decoding_steps=1, return_logits=True)
        return np.asarray(logits)[:, 0]

    reference = first_logits(model)
    for quantize in ("int8", "int8_weight_only"):
        quantized = tiny_fast(eos_token_id=-1)
        quantized.set_weights(model.get_weights())
        quantized.apply_strategy("lora", quantize=quantize)  # B = 0: the adapters add nothing
        embedding = quantized.gemma.token_embedding
        assert embedding.quantization_mode == "int8" and str(embedding.embeddings.dtype) == "int8"
        logits = first_logits(quantized)
        rms = np.sqrt(np.mean(reference**2))
        assert np.sqrt(np.mean(logits**2)) == pytest.approx(rms, rel=0.1), quantize
        assert np.sqrt(np.mean((logits - reference) ** 2)) < 0.1 * rms, quantize
