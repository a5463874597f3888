"""π0-FAST's token layout (openpi's `FASTTokenizer.tokenize`) and action extraction."""

import io
import logging
import pickle

import numpy as np
import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from keras_openpi.tokenizers import FASTPromptTokenizer
from keras_openpi.tokenizers import FASTTokenizer

HORIZON, DIM = 10, 7
NUM_LOC, NUM_SEG = 320, 128
SENTENCES = [
    "Task: pick up the red cup, State: 0 12 128 255;\n",
    "Task: put the towel in the basket, State: 7 64 200 31;\n",
    "Action: move left |",
    "open the drawer and close it 0123456789",
] * 4


def train_sentencepiece(with_locations):
    """A tiny model laid out like PaliGemma's: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, no
    dummy prefix, and (with_locations) 320 `<loc>` then 128 `<seg>` user-defined pieces at the
    top of the vocabulary, where openpi puts the action tokens."""
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=proto,
        vocab_size=320,
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
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto.getvalue())
    if with_locations:
        names = [f"<loc{i:04d}>" for i in range(NUM_LOC)]
        names += [f"<seg{i:03d}>" for i in range(NUM_SEG)]
        for name in names:
            piece = model.pieces.add()
            piece.piece, piece.score = name, 0.0
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tiny_paligemma.model"
    path.write_bytes(train_sentencepiece(with_locations=True))
    return path


@pytest.fixture(scope="module")
def processor(model_path):
    return sentencepiece.SentencePieceProcessor(model_file=str(model_path))


@pytest.fixture(scope="module")
def fast():
    rng = np.random.default_rng(1)
    chunks = rng.uniform(-0.5, 0.5, (300, 1, DIM)) + np.cumsum(
        rng.normal(0.0, 0.04, (300, HORIZON, DIM)), axis=1
    )
    return FASTTokenizer(vocab_size=NUM_LOC).fit(chunks)


@pytest.fixture(scope="module")
def chunk():
    return np.linspace(-0.4, 0.6, HORIZON)[:, None] * np.linspace(-1.0, 1.0, DIM)[None, :]


STATE = np.array([-1.0, 0.0, 0.999, 0.5])


def expected_sequence(processor, fast, chunk):
    """openpi's layout, written from the reference (section 1.8) with raw SentencePiece calls."""
    prefix = processor.encode("Task: pick up the cup, State: 0 128 255 192;\n", add_bos=True)
    vocab = processor.vocab_size()
    actions = [vocab - 1 - 128 - i for i in fast.encode(chunk)]
    postfix = processor.encode("Action: ") + actions + processor.encode("|", add_eos=True)
    return prefix, postfix, actions


def test_token_layout(model_path, processor, fast, chunk):
    tokenizer = FASTPromptTokenizer(model_path, fast, max_len=120)
    tokens, token_mask, ar_mask, loss_mask = tokenizer.tokenize("  Pick_up the CUP ", STATE, chunk)
    prefix, postfix, actions = expected_sequence(processor, fast, chunk)
    n, m = len(prefix), len(postfix)
    assert prefix[0] == 2 and postfix[-1] == 1  # BOS first, EOS last
    assert all(processor.id_to_piece(i).startswith("<loc") for i in actions)
    assert tokens.shape == (120,) and tokens.dtype == np.int32
    assert tokens.tolist() == prefix + postfix + [0] * (120 - n - m)
    pad = 120 - n - m
    assert token_mask.dtype == bool and token_mask.tolist() == [True] * (n + m) + [False] * pad
    assert ar_mask.dtype == np.int32 and ar_mask.tolist() == [0] * n + [1] * m + [0] * pad
    assert loss_mask.dtype == bool
    assert loss_mask.tolist() == [False] * n + [True] * m + [False] * pad
    assert processor.decode(tokens.tolist()).startswith(
        "Task: pick up the cup, State: 0 128 255 192;\nAction: <loc"
    )
    # Inference: the prefix only, all bidirectional, no loss.
    tokens, token_mask, ar_mask, loss_mask = tokenizer.tokenize("  Pick_up the CUP ", STATE)
    assert tokens[:n].tolist() == prefix and token_mask.sum() == n
    assert not ar_mask.any() and not loss_mask.any()


def test_truncation_warns(model_path, processor, fast, chunk, caplog):
    prefix, postfix, _ = expected_sequence(processor, fast, chunk)
    tokenizer = FASTPromptTokenizer(model_path, fast, max_len=len(prefix) + 3)
    with caplog.at_level(logging.WARNING, logger="keras_openpi.tokenizers.fast_prompt"):
        tokens, token_mask, ar_mask, loss_mask = tokenizer.tokenize("pick up the cup", STATE, chunk)
    total = len(prefix) + len(postfix)
    assert f"the sequence has {total} tokens, more than max_len {len(prefix) + 3}" in caplog.text
    assert tokens.tolist() == (prefix + postfix)[: len(prefix) + 3]
    assert token_mask.all() and ar_mask.tolist() == [0] * len(prefix) + [1] * 3
    assert loss_mask.tolist() == [False] * len(prefix) + [True] * 3


def test_extract_actions(model_path, processor, fast, chunk, caplog):
    tokenizer = FASTPromptTokenizer(model_path, fast, max_len=120)
    _, postfix, actions = expected_sequence(processor, fast, chunk)
    expected = fast.decode(fast.encode(chunk), HORIZON, DIM)
    assert np.abs(expected - chunk).max() < 0.15
    # A greedy decode: the postfix, then zero padding after EOS.
    generated = np.array(postfix + [0] * 12)
    np.testing.assert_array_equal(tokenizer.extract_actions(generated, HORIZON, DIM), expected)
    np.testing.assert_array_equal(tokenizer.paligemma_to_fast(actions), fast.encode(chunk))
    # No "Action: ": zeros, as openpi, without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        absent = tokenizer.extract_actions(np.array(processor.encode("hello") + [1]), HORIZON, DIM)
    np.testing.assert_array_equal(absent, np.zeros((HORIZON, DIM)))
    assert absent.dtype == np.float32 and not caplog.records
    # Cut off before "|" with a token missing: zeros and a warning from the FAST decoder.
    cut = np.array(postfix[: -len(processor.encode("|", add_eos=True)) - 1])
    with caplog.at_level(logging.WARNING, logger="keras_openpi.tokenizers.fast"):
        truncated = tokenizer.extract_actions(cut, HORIZON, DIM)
    np.testing.assert_array_equal(truncated, np.zeros((HORIZON, DIM)))
    assert "FAST: cannot decode" in caplog.text
    with pytest.raises(
        ValueError, match="ids outside the PaliGemma vocabulary \\[0, 768\\): \\[900\\]"
    ):
        tokenizer.extract_actions(np.array([900]), HORIZON, DIM)


def test_action_ids_must_fit_the_vocabulary(tmp_path, fast):
    path = tmp_path / "no_locations.model"
    path.write_bytes(train_sentencepiece(with_locations=False))
    # 320 pieces: FAST id 319 would map to 320 - 1 - 128 - 319 = -128.
    with pytest.raises(
        ValueError,
        match="the FAST vocabulary \\(320 tokens\\) does not fit below the top 128 of the "
        "PaliGemma vocabulary \\(320 tokens\\): .* would reach -128, but must stay >= 4 .* "
        "Needs vocabulary_size >= 452",
    ):
        FASTPromptTokenizer(path, fast)
    with pytest.raises(FileNotFoundError, match="no SentencePiece model at"):
        FASTPromptTokenizer(tmp_path / "missing.model", fast)


def test_fast_directory_and_pickling(model_path, fast, chunk, tmp_path):
    fast.save(tmp_path / "fast")
    tokenizer = FASTPromptTokenizer(model_path, tmp_path / "fast", max_len=100, skip_tokens=128)
    reference = FASTPromptTokenizer(model_path, fast, max_len=100)
    clone = pickle.loads(pickle.dumps(tokenizer))
    for other in (tokenizer, clone):
        expected = reference.tokenize("open it", STATE, chunk)
        for a, b in zip(other.tokenize("open it", STATE, chunk), expected):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="'state' must have shape \\(s,\\), got shape \\(2, 2\\)"):
        tokenizer.tokenize("x", np.zeros((2, 2)))


def test_ids_equal_keras_hub_paligemma_tokenizer_on_a_corpus(model_path, fast, chunk):
    """Prefix and postfix over keras-hub's raw ids, laid out as openpi's `FASTTokenizer`."""
    keras_hub = pytest.importorskip("keras_hub")
    from test_tokenizer import CORPUS
    from test_tokenizer import STATES

    hub = keras_hub.models.PaliGemmaTokenizer(proto=str(model_path))

    def ids(text):
        return np.asarray(hub.tokenize(text)).tolist()

    vocab = hub.vocabulary_size()
    actions = [vocab - 1 - 128 - i for i in fast.encode(chunk)]
    postfix = ids("Action: ") + actions + ids("|") + [hub.end_token_id]
    for max_len in (40, 250):
        tokenizer = FASTPromptTokenizer(model_path, fast, max_len=max_len)
        for state in STATES[1:]:
            for prompt in CORPUS:
                cleaned = prompt.lower().strip().replace("_", " ")
                bins = np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1
                bins = " ".join(str(b) for b in bins)
                prefix = [hub.start_token_id] + ids(f"Task: {cleaned}, State: {bins};\n")
                for with_actions in (False, True):
                    sequence = prefix + (postfix if with_actions else [])
                    ar = [0] * len(prefix) + [1] * (len(sequence) - len(prefix))
                    n = min(len(sequence), max_len)
                    tokens, token_mask, ar_mask, loss_mask = tokenizer.tokenize(
                        prompt, state, chunk if with_actions else None
                    )
                    assert tokens.tolist() == sequence[:n] + [0] * (max_len - n), prompt
                    assert token_mask.tolist() == [True] * n + [False] * (max_len - n)
                    assert ar_mask.tolist() == ar[:n] + [0] * (max_len - n)
                    loss = [bool(a) for a in ar[:n]]
                    assert loss_mask.tolist() == loss + [False] * (max_len - n)
