"""The FAST action tokenizer: DCT + quantization + BPE, its error bound, its file format, and
the processor openpi's `AutoProcessor.from_pretrained` loads from a saved directory."""

import ast
import importlib.util
import json
import logging
import pathlib
import pickle
import re
import shutil
import uuid

import numpy as np
import pytest
import scipy.fft
from tokenizers import trainers
from tokenizers.implementations import ByteLevelBPETokenizer

from keras_openpi.tokenizers import FASTTokenizer
from keras_openpi.tokenizers import fast_processor

HORIZON, DIM, SCALE = 10, 7, 10.0


def random_walks(rng, n, horizon=HORIZON, dim=DIM):
    """Smooth normalized action chunks: a random offset plus a random walk of small steps."""
    start = rng.uniform(-0.6, 0.6, (n, 1, dim))
    return start + np.cumsum(rng.normal(0.0, 0.04, (n, horizon, dim)), axis=1)


def dct_matrix(n):
    """The orthonormal DCT-II matrix C (coefficients = C @ x), written from its definition."""
    k, t = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * t + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return random_walks(rng, 400), random_walks(rng, 100)


@pytest.fixture(scope="module")
def fitted(data):
    train, _ = data
    return FASTTokenizer(scale=SCALE, vocab_size=1024).fit(train)


def test_quantize_is_scaled_rounded_orthonormal_dct(fitted, data):
    matrix = dct_matrix(HORIZON)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(HORIZON), atol=1e-12)
    chunk = data[0][0]
    np.testing.assert_array_equal(fitted.quantize(chunk), np.around(SCALE * matrix @ chunk))
    np.testing.assert_allclose(fitted.dequantize(SCALE * matrix @ chunk), chunk, atol=1e-12)
    assert fitted.get_config() == {
        "scale": 10.0,
        "vocab_size": 1024,
        "min_token": int(min(fitted.quantize(c).min() for c in data[0])),
        "time_horizon": HORIZON,
        "action_dim": DIM,
    }


def test_round_trip_within_quantization_bound(fitted, data):
    """decode(encode(x)) = C^T (C x + e) with |e_k| <= 0.5 / scale, so x̂ - x = C^T e and

    |x̂_t - x_t| <= 0.5 / scale * sum_k |C[k, t]|   (per time step t, every dimension)
    ||x̂_:,d - x_:,d||_2 = ||e_:,d||_2 <= 0.5 / scale * sqrt(H)   (C is orthonormal).
    """
    matrix = dct_matrix(HORIZON)
    bound_t = 0.5 / SCALE * np.abs(matrix).sum(axis=0)  # (H,)
    bound_l2 = 0.5 / SCALE * np.sqrt(HORIZON)
    train, held_out = data
    lengths, errors, in_range = [], [], 0
    for chunk in np.concatenate([train, held_out]):
        ids = fitted.encode(chunk)
        assert all(0 <= i < fitted.num_tokens for i in ids)
        restored = fitted.decode(ids, HORIZON, DIM)
        assert restored.shape == (HORIZON, DIM) and restored.dtype == np.float32
        # BPE is lossless: the result is exactly the dequantized (min-clipped) coefficients.
        clipped = np.maximum(fitted.quantize(chunk), fitted.min_token)
        np.testing.assert_allclose(restored, fitted.dequantize(clipped), atol=1e-6)
        lengths.append(len(ids))
        if (fitted.quantize(chunk) >= fitted.min_token).all():
            in_range += 1
            error = restored - chunk
            assert (np.abs(error) <= bound_t[:, None] + 1e-6).all()
            assert (np.linalg.norm(error, axis=0) <= bound_l2 + 1e-6).all()
            errors.append(np.abs(error).max())
    assert in_range >= 495  # all 400 training chunks and nearly all held-out ones
    ratio = HORIZON * DIM / np.mean(lengths)
    print(
        f"\nFAST H={HORIZON} D={DIM} scale={SCALE} vocab=1024: {np.mean(lengths):.1f} tokens per "
        f"chunk of {HORIZON * DIM} values (compression {ratio:.2f}x); max abs error "
        f"{max(errors):.4f} (bound {bound_t.max():.4f})"
    )
    assert ratio > 2.0  # smooth chunks compress well below one token per value
    assert max(errors) <= bound_t.max()


def test_values_outside_the_training_range(fitted, data):
    """Coefficients above the training range still encode (byte fallback); below it, clip."""
    chunk = 4.0 * data[1][0]
    coefficients = fitted.quantize(chunk)
    assert coefficients.max() > max(fitted.quantize(c).max() for c in data[0])
    restored = fitted.decode(fitted.encode(chunk), HORIZON, DIM)
    expected = fitted.dequantize(np.maximum(coefficients, fitted.min_token))
    np.testing.assert_allclose(restored, expected, atol=1e-5)


def test_bad_sequences_decode_to_zeros_with_a_warning(fitted, data, caplog):
    ids = fitted.encode(data[0][0])
    vocab = fitted.num_tokens
    cases = {
        "short": (ids[:-1], HORIZON, DIM, "expected 10 x 7 = 70"),
        "wrong shape": (ids, HORIZON + 1, DIM, "expected 11 x 7 = 77"),
        "negative id": (ids + [-3], HORIZON, DIM, f"ids outside \\[0, {vocab}\\): \\[-3\\]"),
        "id past vocab": (
            [vocab] + ids,
            HORIZON,
            DIM,
            f"ids outside \\[0, {vocab}\\): \\[{vocab}\\]",
        ),
    }
    for name, (bad, horizon, dim, reason) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="keras_openpi.tokenizers.fast"):
            restored = fitted.decode(bad, horizon, dim)
        np.testing.assert_array_equal(restored, np.zeros((horizon, dim)), err_msg=name)
        assert len(caplog.records) == 1, name
        message = caplog.records[0].getMessage()
        assert message.startswith("FAST: cannot decode") and "returning zeros" in message
        assert re.search(reason, message), (name, message)


def test_save_load_round_trip(fitted, data, tmp_path):
    directory = fitted.save(tmp_path / "fast")
    assert sorted(p.name for p in directory.iterdir()) == [
        "fast_processor.py",
        "processor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((directory / "processor_config.json").read_text())
    assert config == {
        **fitted.get_config(),
        "auto_map": {"AutoProcessor": "fast_processor.UniversalActionProcessor"},
        "processor_class": "UniversalActionProcessor",
    }
    loaded = FASTTokenizer.load(directory)
    assert loaded.get_config() == fitted.get_config()
    assert loaded.num_tokens == fitted.num_tokens <= 1024
    unpickled = pickle.loads(pickle.dumps(fitted))
    for chunk in np.concatenate(data)[::7]:
        ids = fitted.encode(chunk)
        assert loaded.encode(chunk) == ids and unpickled.encode(chunk) == ids
        np.testing.assert_array_equal(loaded.decode(ids), fitted.decode(ids, HORIZON, DIM))


def released_layout_directory(root, chunks, min_token, subfolder=""):
    """A directory as the released `UniversalActionProcessor.save_pretrained` writes it.

    Its BPE is trained as the released `fit` trains it (ByteLevelBPETokenizer, initial alphabet
    chr(0..max - min_token)); `min_token` is the released artifact's -354, so the symbols are
    multi-byte characters, as in the real file.
    """
    quantized = [
        np.around(SCALE * scipy.fft.dct(c, axis=0, norm="ortho")).astype(int) for c in chunks
    ]
    strings = ["".join(chr(v - min_token) for v in q.reshape(-1)) for q in quantized]
    top = max(max(map(ord, s)) for s in strings)
    bpe = ByteLevelBPETokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=[chr(i) for i in range(top + 1)],
        max_token_length=10000,
    )
    bpe._tokenizer.train_from_iterator(strings, trainer=trainer)
    root.mkdir()
    (root / "processor_config.json").write_text(
        json.dumps(
            {
                "action_dim": None,
                "auto_map": {
                    "AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"
                },
                "min_token": min_token,
                "processor_class": "UniversalActionProcessor",
                "scale": 10,
                "time_horizon": None,
                "vocab_size": 2048,
            }
        )
    )
    tokenizer_dir = root / subfolder
    tokenizer_dir.mkdir(exist_ok=True)
    bpe._tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    tokenizer_config = '{"tokenizer_class": "PreTrainedTokenizerFast"}'
    (tokenizer_dir / "tokenizer_config.json").write_text(tokenizer_config)
    return bpe


@pytest.mark.parametrize("subfolder", ["", "bpe_tokenizer"])
def test_load_released_processor_layout(data, tmp_path, subfolder, caplog):
    train, held_out = data
    bpe = released_layout_directory(tmp_path / "fast", train, -354, subfolder)
    loaded = FASTTokenizer.load(tmp_path / "fast")
    assert loaded.get_config() == {
        "scale": 10.0,
        "vocab_size": 2048,
        "min_token": -354,
        "time_horizon": None,
        "action_dim": None,
    }
    for chunk in held_out[:20]:
        # The released processor: frequency-major (row-major (H, D)) symbols, clipped at 0.
        coefficients = np.around(SCALE * scipy.fft.dct(chunk, axis=0, norm="ortho")).astype(int)
        text = "".join(chr(max(v + 354, 0)) for v in coefficients.reshape(-1))
        ids = loaded.encode(chunk)
        assert ids == bpe.encode(text).ids
        assert bpe.decode(ids) == text
        np.testing.assert_allclose(
            loaded.decode(ids, HORIZON, DIM), loaded.dequantize(coefficients), atol=1e-6
        )
    with pytest.raises(ValueError, match="decode needs the chunk shape: pass 'horizon' and 'dim'"):
        loaded.decode(ids)
    # 70 lone UTF-8 lead bytes (0xC5 is 'Å' in the byte-level alphabet) decode to 70 U+FFFD:
    # the right length, but no symbols; zeros rather than openpi's huge coefficients.
    lead_byte = bpe.token_to_id("Å")
    with caplog.at_level(logging.WARNING, logger="keras_openpi.tokenizers.fast"):
        restored = loaded.decode([lead_byte] * (HORIZON * DIM), HORIZON, DIM)
    np.testing.assert_array_equal(restored, np.zeros((HORIZON, DIM)))
    assert "do not form valid characters" in caplog.text


def test_errors(data, tmp_path):
    with pytest.raises(ValueError, match="'vocab_size' must be at least 256 .*got 100"):
        FASTTokenizer(vocab_size=100).fit(data[0])
    with pytest.raises(ValueError, match="'action_chunks' is empty"):
        FASTTokenizer().fit([])
    with pytest.raises(ValueError, match="'action_chunks\\[1\\]' must be an action chunk of shape"):
        FASTTokenizer().fit([data[0][0], data[0][0, 0]])
    with pytest.raises(ValueError, match="a quantized DCT coefficient \\(.*\\) is too large"):
        FASTTokenizer(scale=1e6).fit(data[0][:5])
    with pytest.raises(ValueError, match="'scale' must be positive, got 0"):
        FASTTokenizer(scale=0)
    with pytest.raises(ValueError, match="no BPE vocabulary: call fit\\(action_chunks\\)"):
        FASTTokenizer().encode(data[0][0])
    tokenizer = FASTTokenizer(vocab_size=300).fit(data[0][:50])
    with pytest.raises(
        ValueError,
        match="'chunk' must be an action chunk of shape \\(H, D\\), got shape \\(2, 10, 7\\)",
    ):
        tokenizer.encode(data[0][:2])
    with pytest.raises(ValueError, match="'chunk' holds NaN"):
        tokenizer.encode(np.full((HORIZON, DIM), np.nan))
    with pytest.raises(FileNotFoundError, match="no processor_config.json in"):
        FASTTokenizer.load(tmp_path)
    (tmp_path / "processor_config.json").write_text('{"scale": 10}')
    with pytest.raises(ValueError, match="has no 'min_token': got keys \\['scale'\\]"):
        FASTTokenizer.load(tmp_path)
    (tmp_path / "processor_config.json").write_text('{"scale": 10, "min_token": -5}')
    with pytest.raises(
        FileNotFoundError, match="no tokenizer.json in .* \\(nor in bpe_tokenizer/\\)"
    ):
        FASTTokenizer.load(tmp_path)


def test_small_vocabulary_warns(data, caplog):
    with caplog.at_level(logging.WARNING, logger="keras_openpi.tokenizers.fast"):
        tokenizer = FASTTokenizer(scale=200.0, vocab_size=300).fit(data[0][:50])
    assert "quantized values nearly fill the vocabulary of 300" in caplog.text
    chunk = data[0][0]
    np.testing.assert_allclose(
        tokenizer.decode(tokenizer.encode(chunk)),
        tokenizer.dequantize(tokenizer.quantize(chunk)),
        atol=1e-6,
    )


# === openpi's loading path: AutoProcessor.from_pretrained(directory, trust_remote_code=True) ===

# What the processor module may import: openpi's environment has these, not keras_openpi.
PROCESSOR_IMPORTS = {"json", "logging", "pathlib", "numpy", "scipy", "tokenizers"}


def _module_imports(source):
    """Top-level packages a module imports outside try blocks (what transformers requires)."""
    names = set()
    tried = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            tried.update(id(child) for part in node.body for child in ast.walk(part))
    for node in ast.walk(tree):
        if id(node) in tried:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports need files next to the module"
            names.add(node.module.split(".")[0])
    return names


def _load_module(path):
    spec = importlib.util.spec_from_file_location(f"saved_fast_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _processor_class(directory):
    """The class `auto_map` names, imported from the directory's own file (as transformers does)."""
    config = json.loads((directory / "processor_config.json").read_text())
    module_name, class_name = config["auto_map"]["AutoProcessor"].split(".")
    module = _load_module(directory / f"{module_name}.py")
    return getattr(module, class_name), module


def test_saved_directory_holds_the_processor_openpi_loads(fitted, tmp_path):
    directory = fitted.save(tmp_path / "fast")
    source = (directory / "fast_processor.py").read_text()
    assert source == pathlib.Path(fast_processor.__file__).read_text()
    assert _module_imports(source) <= PROCESSOR_IMPORTS
    assert "keras_openpi" not in _module_imports(source)
    processor_class, _ = _processor_class(directory)
    assert processor_class.__name__ == "UniversalActionProcessor"
    # AutoProcessor's calls, in its order.
    processor_class.register_for_auto_class()
    processor = processor_class.from_pretrained(str(directory), trust_remote_code=True)
    assert (processor.scale, processor.min_token, processor.vocab_size) == (
        fitted.scale,
        fitted.min_token,
        fitted.vocab_size,
    )
    assert (processor.time_horizon, processor.action_dim) == (HORIZON, DIM)


def test_processor_encodes_and_decodes_as_fast_tokenizer(fitted, data, tmp_path, caplog):
    directory = fitted.save(tmp_path / "fast")
    processor_class, module = _processor_class(directory)
    processor = processor_class.from_pretrained(directory)
    chunks = np.concatenate(data)[::9]
    ids = processor(chunks)
    assert ids == [fitted.encode(chunk) for chunk in chunks]
    decoded = processor.decode(ids, time_horizon=HORIZON, action_dim=DIM)
    assert decoded.shape == (len(chunks), HORIZON, DIM)
    expected = np.stack([fitted.decode(i, HORIZON, DIM) for i in ids])
    np.testing.assert_array_equal(decoded.astype(np.float32), expected)
    # openpi's FASTTokenizer: `processor(actions[None])[0]` and `decode([ids], ...)[0]`.
    actions = 3.0 * chunks[0]  # beyond the training range: byte fallback and clipping
    tokens = processor(actions[None])[0]
    assert tokens == fitted.encode(actions) == processor(actions)[0]
    np.testing.assert_array_equal(
        processor.decode([tokens], time_horizon=HORIZON, action_dim=DIM)[0].astype(np.float32),
        fitted.decode(tokens),
    )
    assert processor.bpe_tokenizer.decode(tokens) == fitted._to_text(fitted.quantize(actions))
    # Invalid ids decode to zeros with a warning, as FASTTokenizer decodes them.
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        bad = processor.decode([tokens[:-1], [-1]], time_horizon=HORIZON, action_dim=DIM)
    np.testing.assert_array_equal(bad, np.zeros((2, HORIZON, DIM)))
    assert "ids outside [0, " in caplog.text and "expected 10 x 7 = 70" in caplog.text
    with pytest.raises(ValueError, match="a quantized DCT coefficient .* is too large"):
        processor(np.full((HORIZON, DIM), 1e5))
    with pytest.raises(ValueError, match="action chunks \\(B, H, D\\) or \\(H, D\\), got shape"):
        processor(np.zeros(DIM))


def test_processor_shape_defaults_as_released(data, tmp_path):
    # Chunks of different shapes leave no time_horizon / action_dim in the config.
    tokenizer = FASTTokenizer(scale=SCALE, vocab_size=300).fit([data[0][0], data[0][1, :5]])
    directory = tokenizer.save(tmp_path / "fast")
    processor_class, _ = _processor_class(directory)
    processor = processor_class.from_pretrained(directory)
    with pytest.raises(ValueError, match="FAST decode needs the chunk shape"):
        processor.decode([[1]])
    ids = processor(data[1][:2])  # the last call's shape is decode's default
    np.testing.assert_array_equal(
        processor.decode(ids).astype(np.float32), [tokenizer.decode(i, HORIZON, DIM) for i in ids]
    )


@pytest.mark.parametrize("subfolder", ["", "bpe_tokenizer"])
def test_processor_reads_released_layout(data, tmp_path, subfolder):
    bpe = released_layout_directory(tmp_path / "fast", data[0], -354, subfolder)
    module = tmp_path / "fast" / "fast_processor.py"
    shutil.copyfile(fast_processor.__file__, module)
    processor = _load_module(module).UniversalActionProcessor.from_pretrained(tmp_path / "fast")
    loaded = FASTTokenizer.load(tmp_path / "fast")
    for chunk in data[1][:10]:
        (ids,) = processor(chunk)
        assert ids == loaded.encode(chunk) and bpe.decode(ids) == loaded._to_text(
            loaded.quantize(chunk)
        )


def test_auto_processor_loads_saved_directory(fitted, data, tmp_path):
    """openpi's own call (transformers is in the test extra for this test)."""
    import transformers

    directory = fitted.save(tmp_path / "fast")
    processor = transformers.AutoProcessor.from_pretrained(str(directory), trust_remote_code=True)
    assert type(processor).__name__ == "UniversalActionProcessor"
    chunks = data[1][:10]
    ids = processor(chunks)
    assert ids == [fitted.encode(chunk) for chunk in chunks]
    np.testing.assert_array_equal(
        processor.decode(ids, time_horizon=HORIZON, action_dim=DIM).astype(np.float32),
        [fitted.decode(i) for i in ids],
    )
