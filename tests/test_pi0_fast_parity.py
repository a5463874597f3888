"""π0-FAST against openpi's own JAX outputs (tests/fixtures/openpi/pi0_fast.npz), float32, 1e-4."""

import keras
import numpy as np
import pytest

from keras_openpi.cli import main as cli
from keras_openpi.convert import load_openpi_params
from keras_openpi.convert import openpi_model_type
from keras_openpi.convert import pi0_fast_config_from_params
from keras_openpi.convert import pi0_fast_from_openpi
from keras_openpi.convert import pi0_from_openpi
from keras_openpi.convert.keras_file import load_keras_policy
from keras_openpi.models import Pi0Fast
from keras_openpi.tokenizers import FASTPromptTokenizer

ATOL = 1e-4


def training_observation(fixture, image_keys):
    d = fixture
    return {
        "image": {k: d[f"input/images/{k}"] for k in image_keys},
        "image_mask": {k: d[f"input/masks/{k}"] for k in image_keys},
        "tokenized_prompt": d["input/toks"],
        "tokenized_prompt_mask": d["input/tmask"],
        "token_ar_mask": d["input/ar_mask"],
        "token_loss_mask": d["input/loss_mask"],
    }


def decode_observation(fixture, image_keys):
    """The fixture's decode inputs: the prefix part of the prompt, an all-zero AR mask."""
    observation = training_observation(fixture, image_keys)
    del observation["token_loss_mask"]
    observation["tokenized_prompt_mask"] = fixture["input/prefix_tmask"]
    observation["token_ar_mask"] = np.zeros_like(fixture["input/ar_mask"])
    return observation


@pytest.fixture(scope="module")
def fixture(openpi_fixture):
    return openpi_fixture("pi0_fast")


@pytest.fixture(scope="module")
def model(fixture):
    meta = fixture.meta
    return pi0_fast_from_openpi(
        fixture.path,
        action_dim=meta["action_dim"],
        action_horizon=meta["action_horizon"],
        max_token_len=meta["max_token_len"],
    )


def test_config_is_inferred_from_the_checkpoint(fixture, model):
    params = load_openpi_params(fixture.path)
    assert openpi_model_type(params) == "pi0_fast"
    config = pi0_fast_config_from_params(params)
    assert config["paligemma_variant"] == dict(
        width=64, depth=3, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16
    )
    assert config["vision_variant"] == dict(
        width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=16
    )
    assert config["vocabulary_size"] == 1024 and config["image_resolution"] == (224, 224)
    assert (
        model.image_keys == tuple(fixture.image_keys) == ("base_0_rgb", "base_1_rgb", "wrist_0_rgb")
    )
    assert model.count_params() == sum(int(np.prod(v.shape)) for v in params.values())


def test_token_loss(fixture, model):
    loss = model.token_loss(training_observation(fixture, model.image_keys))
    assert loss.shape == (2,)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss), fixture["output/loss"], atol=ATOL, rtol=0)


def test_greedy_decode_tokens_and_logits(fixture, model):
    """The fixture's 12-step decode pins down alignment, positions and the key range.

    Its first example has a masked wrist camera between valid tokens, so the
    contiguous key range of openpi's decode steps differs from the input mask.
    """
    tokens, logits = model.generate(
        decode_observation(fixture, model.image_keys),
        max_decoding_steps=12,
        temperature=0.0,
        return_logits=True,
    )
    assert tokens.shape == (2, 12) and logits.shape == (2, 12, 1024)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(tokens), fixture["output/greedy_tokens"].astype(np.int32)
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(logits), fixture["output/decode_logits"], atol=ATOL, rtol=0
    )


def test_cli_converts_pi0_fast(tmp_path, fixture):
    output = tmp_path / "pi0_fast.keras"
    code = cli(
        [
            "convert",
            "openpi",
            str(fixture.path),
            "--model",
            "pi0_fast",
            "--action-dim",
            "6",
            "--action-horizon",
            "5",
            "--max-token-len",
            "24",
            "--output",
            str(output),
        ]
    )
    assert code == 0 and output.exists()
    model = keras.saving.load_model(output)
    assert type(model) is Pi0Fast
    assert (model.action_dim, model.action_horizon, model.max_token_len) == (6, 5, 24)
    loss = model.token_loss(training_observation(fixture, model.image_keys))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss), fixture["output/loss"], atol=ATOL, rtol=0)
    tokens = model.generate(decode_observation(fixture, model.image_keys), max_decoding_steps=12)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(tokens), fixture["output/greedy_tokens"].astype(np.int32)
    )



def test_cli_converted_pi0_fast_carries_its_tokenizer(tmp_path, fixture, capsys):
    """--paligemma-tokenizer and --fast-tokenizer: the .keras file carries both, at the model's length."""
    from fast_support import write_tokenizer_files

    model_path, fast_dir = write_tokenizer_files(tmp_path / "tokenizer", 5, 6)
    output = tmp_path / "pi0_fast.keras"
    base = ["convert", "openpi", str(fixture.path), "--model", "pi0_fast", "--action-dim", "6",
            "--action-horizon", "5", "--max-token-len", "64", "--output", str(output)]
    errors = [
        (["--paligemma-tokenizer", str(model_path)], "--fast-tokenizer is needed too"),
        (["--fast-tokenizer", str(fast_dir)], "--paligemma-tokenizer is needed too"),
        (
            ["--paligemma-tokenizer", str(tmp_path), "--fast-tokenizer", str(fast_dir)],
            f"--paligemma-tokenizer {tmp_path} is not a file.",
        ),
        (
            ["--paligemma-tokenizer", str(model_path), "--fast-tokenizer", str(model_path)],
            f"--fast-tokenizer {model_path} is not a directory",
        ),
    ]
    for flags, message in errors:
        assert cli(base + flags) == 2
        assert message in capsys.readouterr().err
    pi0 = ["convert", "openpi", str(fixture.path), "--model", "pi0", "--action-horizon", "5",
           "--output", str(output), "--fast-tokenizer", str(fast_dir)]
    assert cli(pi0) == 2
    assert "--fast-tokenizer is for pi0_fast" in capsys.readouterr().err
    assert not output.exists()

    flags = ["--paligemma-tokenizer", str(model_path), "--fast-tokenizer", str(fast_dir)]
    assert cli(base + flags) == 0
    model = load_keras_policy(output)
    tokenizer = model.tokenizer.tokenizer
    assert tokenizer is not None and tokenizer.max_len == 64
    # The carried tokenizer is the files': the same ids, the same decoded chunk.
    files = FASTPromptTokenizer(model_path, fast_dir, max_len=64)
    chunk = np.linspace(-0.5, 0.5, 30, dtype=np.float32).reshape(5, 6)
    ids = tokenizer.tokenize("pick", np.zeros(6, np.float32), chunk)[0]
    np.testing.assert_array_equal(ids, files.tokenize("pick", np.zeros(6, np.float32), chunk)[0])
    decoded = model.tokenizer.extract_actions(ids, 5, 6, strict=True)
    np.testing.assert_array_equal(decoded, files.extract_actions(ids, 5, 6))
    assert np.abs(decoded - chunk).max() < 0.5  # FAST's quantization, not zeros

def test_cli_and_importer_check_the_model_type(tmp_path, fixture, openpi_fixture, capsys):
    output = str(tmp_path / "out.keras")
    base = ["convert", "openpi", str(fixture.path), "--action-horizon", "5", "--output", output]
    assert cli(base + ["--model", "pi0_fast"]) == 2
    assert "--model pi0_fast needs --action-dim" in capsys.readouterr().err
    assert cli(base + ["--model", "pi0"]) == 2
    assert "holds a pi0_fast model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--model pi0_fast was asked for, .* holds a pi0 model"):
        pi0_fast_from_openpi(openpi_fixture("pi0").path, action_dim=8, action_horizon=10)
    with pytest.raises(ValueError, match="holds a pi0_fast model"):
        pi0_from_openpi(fixture.path, action_horizon=5)
    assert not (tmp_path / "out.keras").exists()
