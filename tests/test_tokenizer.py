"""The PaliGemma prompt tokenizer, TokenizePrompt, and the full transform chain."""

import io
import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import sentencepiece

from keras_openpi.data.normalize import NormStats
from keras_openpi.data.pipeline import build_transforms
from keras_openpi.data.pipeline import model_transforms
from keras_openpi.data.pipeline import uses_quantile_norm
from keras_openpi.data.robots import get_robot
from keras_openpi.data.robots import libero
from keras_openpi.data.transforms import TokenizePrompt
from keras_openpi.data.transforms import compose
from keras_openpi.tokenizers import PaliGemmaTokenizer
from keras_openpi.tokenizers.prompt_tokenizer import discretize_state

SENTENCES = [
    "pick up the red cup",
    "put the towel in the basket",
    "Task: fold the towel, State: 0 12 128 255;",
    "Action: move left",
    "open the drawer and close it",
] * 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny SentencePiece model with PaliGemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=proto,
        vocab_size=340,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        byte_fallback=True,
        user_defined_symbols=["\n"],
        character_coverage=1.0,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tiny.model"
    path.write_bytes(proto.getvalue())
    return path


@pytest.fixture(scope="module")
def processor(model_path):
    return sentencepiece.SentencePieceProcessor(model_file=str(model_path))


def test_pi0_prompt_format(model_path, processor):
    tokenizer = PaliGemmaTokenizer(model_path, max_len=40)
    tokens, mask = tokenizer.tokenize("  pick_up the\nred cup ")
    # openpi: encode(cleaned, add_bos=True) + encode("\n"), cleaned = strip, "_" and "\n" → " ".
    expected = processor.encode("pick up the red cup", add_bos=True) + processor.encode("\n")
    assert expected[0] == 2  # BOS
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (40,)
    assert tokens[: len(expected)].tolist() == expected
    assert tokens[len(expected) :].tolist() == [0] * (40 - len(expected))
    assert mask.tolist() == [True] * len(expected) + [False] * (40 - len(expected))
    assert tokenizer.decode(tokens) == "pick up the red cup \n"


def test_truncation_warns(model_path, processor):
    tokenizer = PaliGemmaTokenizer(model_path, max_len=5)
    full = processor.encode("put the towel in the basket", add_bos=True) + processor.encode("\n")
    with pytest.warns(UserWarning, match=f"the prompt has {len(full)} tokens, more than max_len 5"):
        tokens, mask = tokenizer.tokenize("put the towel in the basket")
    assert tokens.tolist() == full[:5] and mask.all()


def test_discretize_state():
    # 256 bins of width 2/256 on [-1, 1]: -0.99 is 1.28 bins in; below -1 gives -1.
    state = np.array([-1.5, -1.0, -0.99, 0.0, 0.5, 0.999, 1.0, 2.0])
    assert discretize_state(state).tolist() == [-1, 0, 1, 128, 192, 255, 255, 255]


def test_pi05_prompt_with_discrete_state(model_path, processor):
    tokenizer = PaliGemmaTokenizer(model_path, max_len=120)
    tokens, mask = tokenizer.tokenize("fold_the towel", np.array([-1.0, 0.0, 0.999, 0.5]))
    expected = processor.encode(
        "Task: fold the towel, State: 0 128 255 192;\nAction: ", add_bos=True
    )
    assert tokens[: mask.sum()].tolist() == expected
    assert mask.sum() == len(expected)
    with pytest.raises(ValueError, match="'state' must have shape \\(s,\\)"):
        tokenizer.tokenize("x", np.zeros((2, 2)))


def test_tokenizer_file_and_pickling(model_path, tmp_path):
    with pytest.raises(
        FileNotFoundError, match="no SentencePiece model at .*paligemma_tokenizer.model"
    ):
        PaliGemmaTokenizer(tmp_path / "missing.model")
    tokenizer = PaliGemmaTokenizer(model_path, max_len=16)
    assert tokenizer.vocabulary_size == 340
    clone = pickle.loads(pickle.dumps(tokenizer))
    for a, b in zip(clone.tokenize("open the drawer"), tokenizer.tokenize("open the drawer")):
        np.testing.assert_array_equal(a, b)


def test_tokenize_prompt_transform(model_path):
    tokenizer = PaliGemmaTokenizer(model_path, max_len=32)
    sample = {"prompt": np.asarray("pick up the red cup"), "state": np.array([0.0, 0.5])}
    out = TokenizePrompt(tokenizer)(sample)
    assert "prompt" not in out and "prompt" in sample
    expected, expected_mask = tokenizer.tokenize("pick up the red cup")
    np.testing.assert_array_equal(out["tokenized_prompt"], expected)
    np.testing.assert_array_equal(out["tokenized_prompt_mask"], expected_mask)
    out = TokenizePrompt(tokenizer, discrete_state_input=True)({**sample, "prompt": b"pick up"})
    np.testing.assert_array_equal(
        out["tokenized_prompt"], tokenizer.tokenize("pick up", np.array([0.0, 0.5]))[0]
    )
    with pytest.raises(ValueError, match="TokenizePrompt: the sample has no 'prompt'"):
        TokenizePrompt(tokenizer)({"state": np.zeros(2)})
    with pytest.raises(ValueError, match="discrete_state_input needs 'state'"):
        TokenizePrompt(tokenizer, discrete_state_input=True)({"prompt": "x"})


def test_full_pi05_libero_chain(model_path):
    """repack → LiberoInputs → Normalize (quantile) → π0.5 model transforms, and back."""
    tokenizer = PaliGemmaTokenizer(model_path, max_len=120)
    q01 = np.arange(8) * 0.1
    stats = {
        "state": NormStats(mean=np.zeros(8), std=np.ones(8), q01=q01, q99=q01 + 2.0),
        "actions": NormStats(mean=np.zeros(7), std=np.ones(7), q01=-np.ones(7), q99=np.ones(7) * 3),
    }
    assert uses_quantile_norm("pi05") and not uses_quantile_norm("pi0")
    chain = build_transforms(
        robot=get_robot("libero", model_type="pi05"),
        model=model_transforms("pi05", tokenizer=tokenizer, action_dim=32, default_prompt="stack"),
        norm_stats=stats,
        use_quantiles=True,
    )
    example = libero.make_libero_example()
    example["observation/image"] = np.zeros((128, 256, 3), np.uint8)
    example["actions"] = np.full((4, 7), 1.0)
    del example["prompt"]
    sample = compose(chain.inputs)(example)
    assert sorted(sample) == [
        "actions",
        "image",
        "image_mask",
        "state",
        "tokenized_prompt",
        "tokenized_prompt_mask",
    ]
    assert sample["image"]["base_0_rgb"].shape == (224, 224, 3)  # resized with padding
    assert sample["state"].shape == (32,) and sample["actions"].shape == (4, 32)
    # Quantile normalization before padding: (x - q01) / (2 + 1e-6) * 2 - 1, then zeros.
    state = example["observation/state"]
    normalized = (state - q01) / (2.0 + 1e-6) * 2.0 - 1.0
    np.testing.assert_allclose(sample["state"][:8], normalized, rtol=1e-5)
    np.testing.assert_array_equal(sample["state"][8:], 0.0)
    np.testing.assert_allclose(
        sample["actions"][:, :7], (1.0 + 1.0) / (4 + 1e-6) * 2 - 1, rtol=1e-6
    )
    # π0.5 tokenizes the default prompt with the normalized, unpadded state.
    expected, _ = tokenizer.tokenize("stack", normalized)
    np.testing.assert_array_equal(sample["tokenized_prompt"], expected)
    # Outputs: the model's 32-dim actions → unnormalized → LIBERO's 7 dims.
    model_out = {"actions": np.zeros((4, 32), np.float32), "state": sample["state"]}
    actions = compose(chain.outputs)(model_out)["actions"]
    np.testing.assert_allclose(actions, np.full((4, 7), 0.5 * (4 + 1e-6) - 1.0), rtol=1e-6)
    with pytest.raises(ValueError, match="model transforms exist for 'pi0', 'pi05' and 'pi0_fast'"):
        model_transforms("pi1", tokenizer=tokenizer, action_dim=32)


# === keras-hub's PaliGemmaTokenizer ===

# Prompts as robots get them: unicode (accents, CJK, emoji, combining marks),
# punctuation, whitespace runs, tabs and newlines, underscores, the empty
# prompt, one past any max_len below (truncated), and text that looks like
# the π0.5 layout itself.
CORPUS = [
    "pick up the red cup",
    "  Pick_up the\nRED cup  ",
    "",
    "   ",
    "\n",
    "_",
    "put the towel in the basket.",
    "open the drawer; then close it!",
    "move (slowly) to [x=0.25, y=-1.5] — then stop?",
    "a  b   c    d\t\te",
    "line one\nline two\r\nline three",
    "café déjà vu, naïve façade",
    "把杯子放在桌子上",
    "grab the 🍎 and the 🍌",
    "e\u0301 combining accent",
    "Task: fold the towel, State: 0 12 128 255;\nAction: ",
    "snake_case_instruction__with___runs",
    "0123456789 " * 3,
    "put the towel in the basket and open the drawer and close it " * 8,
]
STATES = [None, np.array([-1.0, -0.5, 0.0, 0.999, 1.5]), np.linspace(-1.2, 1.2, 14)]


def keras_hub_reference(hub, prompt, state, max_len):
    """openpi's layout written over keras-hub's raw ids (`hub.tokenize` adds no BOS)."""

    def ids(text):
        return np.asarray(hub.tokenize(text)).tolist()

    cleaned = prompt.strip().replace("_", " ").replace("\n", " ")
    if state is None:
        tokens = [hub.start_token_id] + ids(cleaned) + ids("\n")
    else:
        bins = np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1
        bins = " ".join(str(b) for b in bins)
        tokens = [hub.start_token_id] + ids(f"Task: {cleaned}, State: {bins};\nAction: ")
    kept = tokens[:max_len]
    return kept + [0] * (max_len - len(kept)), [True] * len(kept), len(tokens)


def test_ids_equal_keras_hub_paligemma_tokenizer_on_a_corpus(model_path):
    keras_hub = pytest.importorskip("keras_hub")
    hub = keras_hub.models.PaliGemmaTokenizer(proto=str(model_path))
    assert (hub.start_token_id, hub.end_token_id, hub.pad_token_id) == (2, 1, 0)
    for max_len in (24, 200):
        tokenizer = PaliGemmaTokenizer(model_path, max_len=max_len)
        truncated = 0
        for state in STATES:
            for prompt in CORPUS:
                expected, valid, length = keras_hub_reference(hub, prompt, state, max_len)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tokens, mask = tokenizer.tokenize(prompt, state)
                assert len(caught) == (length > max_len), (prompt, state)
                truncated += length > max_len
                assert tokens.tolist() == expected, (prompt, state)
                assert mask.tolist() == valid + [False] * (max_len - len(valid))
        # Only the long prompt is cut at 200; at 24 also most π0.5 texts.
        assert truncated == (3 if max_len == 200 else 46)
    # Byte fallback reaches the unicode prompts (no <unk>).
    assert 3 not in PaliGemmaTokenizer(model_path, 200).tokenize(CORPUS[12])[0]


def test_keras_hub_tensorflow_path_gives_the_same_ids(model_path):
    """keras-hub's tf.data path (TensorFlow Text's SentencePiece op) agrees with its Python path."""
    keras_hub = pytest.importorskip("keras_hub")
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_text")
    hub = keras_hub.models.PaliGemmaTokenizer(proto=str(model_path))
    dataset = tf.data.Dataset.from_tensor_slices(CORPUS).map(hub)
    for prompt, ids in zip(CORPUS, dataset.as_numpy_iterator()):
        assert ids.tolist() == np.asarray(hub.tokenize(prompt)).tolist(), prompt


def test_to_keras_hub_shares_the_vocabulary(model_path):
    pytest.importorskip("keras_hub")
    tokenizer = PaliGemmaTokenizer(model_path, max_len=16)
    hub = tokenizer.to_keras_hub()
    assert type(hub).__name__ == "PaliGemmaTokenizer"
    assert hub.proto == model_path.read_bytes()
    assert hub.vocabulary_size() == tokenizer.vocabulary_size == 340
    tokens, mask = tokenizer.tokenize("open the drawer")
    assert hub.detokenize(tokens[mask][1:]) == "open the drawer \n"


def test_preset_is_keras_hubs_layout(model_path, tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    import keras

    tokenizer = PaliGemmaTokenizer(model_path, max_len=32)
    preset = tmp_path / "preset"
    tokenizer.save_to_preset(preset)
    assert sorted(p.relative_to(preset).as_posix() for p in preset.rglob("*") if p.is_file()) == [
        "assets/tokenizer/vocabulary.spm",
        "tokenizer.json",
    ]
    assert (preset / "assets/tokenizer/vocabulary.spm").read_bytes() == model_path.read_bytes()
    config = json.loads((preset / "tokenizer.json").read_text())
    assert config["registered_name"] == "keras_hub>PaliGemmaTokenizer"
    # Read back by this package, and by keras-hub's preset loader
    # (`KerasPresetLoader.load_tokenizer`: deserialize, then load the assets).
    loaded = PaliGemmaTokenizer.from_preset(preset, max_len=32)
    hub = keras.saving.deserialize_keras_object(config)
    hub.load_preset_assets(str(preset))
    assert isinstance(hub, keras_hub.models.PaliGemmaTokenizer)
    for prompt in CORPUS:
        expected = keras_hub_reference(hub, prompt, None, 32)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert loaded.tokenize(prompt)[0].tolist() == expected
            assert tokenizer.tokenize(prompt)[0].tolist() == expected
    # A preset keras-hub itself wrote reads the same.
    theirs = tmp_path / "keras_hub_preset"
    keras_hub.models.PaliGemmaTokenizer(proto=str(model_path)).save_to_preset(str(theirs))
    assert PaliGemmaTokenizer.from_preset(str(theirs), 32).tokenize("pick up")[0].tolist() == (
        tokenizer.tokenize("pick up")[0].tolist()
    )


def test_preset_errors(model_path, tmp_path):
    pytest.importorskip("keras_hub")
    with pytest.raises(
        FileNotFoundError,
        match=f"the preset {tmp_path} has no assets/tokenizer/vocabulary.spm: a keras-hub "
        "tokenizer preset holds tokenizer.json",
    ):
        PaliGemmaTokenizer.from_preset(tmp_path)
    # A vocabulary without PaliGemma's pieces is no keras-hub PaliGemmaTokenizer: nothing written.
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=proto,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    plain = tmp_path / "plain.model"
    plain.write_bytes(proto.getvalue())
    with pytest.raises(
        ValueError, match="Cannot find special token `'<(bos|eos|pad)>'` in the provided vocabulary"
    ):
        PaliGemmaTokenizer(plain).save_to_preset(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizing_imports_neither_keras_hub_nor_tensorflow(model_path):
    script = (
        "import sys\n"
        "from keras_openpi.tokenizers import PaliGemmaTokenizer\n"
        f"PaliGemmaTokenizer({str(model_path)!r}, 16).tokenize('pick up', [0.5])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'keras', 'keras_hub', 'tensorflow', 'jax'}))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
