"""The PaliGemma prompt tokenizer, TokenizePrompt, and the full transform chain."""

import io
import pickle

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
from keras_openpi.tokenizers import PaligemmaTokenizer
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
    tokenizer = PaligemmaTokenizer(model_path, max_len=40)
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
    tokenizer = PaligemmaTokenizer(model_path, max_len=5)
    full = processor.encode("put the towel in the basket", add_bos=True) + processor.encode("\n")
    with pytest.warns(UserWarning, match=f"the prompt has {len(full)} tokens, more than max_len 5"):
        tokens, mask = tokenizer.tokenize("put the towel in the basket")
    assert tokens.tolist() == full[:5] and mask.all()


def test_discretize_state():
    # 256 bins of width 2/256 on [-1, 1]: -0.99 is 1.28 bins in; below -1 gives -1.
    state = np.array([-1.5, -1.0, -0.99, 0.0, 0.5, 0.999, 1.0, 2.0])
    assert discretize_state(state).tolist() == [-1, 0, 1, 128, 192, 255, 255, 255]


def test_pi05_prompt_with_discrete_state(model_path, processor):
    tokenizer = PaligemmaTokenizer(model_path, max_len=120)
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
        PaligemmaTokenizer(tmp_path / "missing.model")
    tokenizer = PaligemmaTokenizer(model_path, max_len=16)
    assert tokenizer.vocabulary_size == 340
    clone = pickle.loads(pickle.dumps(tokenizer))
    for a, b in zip(clone.tokenize("open the drawer"), tokenizer.tokenize("open the drawer")):
        np.testing.assert_array_equal(a, b)


def test_tokenize_prompt_transform(model_path):
    tokenizer = PaligemmaTokenizer(model_path, max_len=32)
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
    tokenizer = PaligemmaTokenizer(model_path, max_len=120)
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
