"""openpi checkpoint import: orbax and npz, the CLI, and its errors."""

import os

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_openpi.cli import main as cli
from keras_openpi.convert import load_openpi_params
from keras_openpi.convert import pi0_config_from_params
from keras_openpi.convert import pi0_from_openpi
from keras_openpi.data.transforms import unflatten_dict

from conftest import fixture_path


def _write_orbax(path, flat):
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(os.fspath(path), {"params": unflatten_dict(flat)})


def _sample(model, fixture):
    return np.asarray(
        model.sample_actions(
            fixture.observation(model.image_keys), noise=fixture["input/noise"]
        )
    )


def test_cli_converts_the_orbax_checkpoint(tmp_path, openpi_fixture):
    fixture = openpi_fixture("pi0")
    output = tmp_path / "pi0.keras"
    source = fixture_path("pi0_checkpoint") / "params"
    code = cli(
        ["convert", "openpi", str(source), "--model", "pi0", "--action-horizon", "10",
         "--max-token-len", "16", "--output", str(output)]
    )
    assert code == 0 and output.exists()
    model = keras.saving.load_model(output)
    assert model.action_horizon == 10 and model.max_token_len == 16
    np.testing.assert_allclose(
        _sample(model, fixture), fixture["output/sampled"], atol=1e-4, rtol=0
    )
    loss = model.flow_matching_loss(
        fixture.observation(model.image_keys), fixture["input/actions"],
        noise=fixture["input/noise"], time=fixture["input/time"],
    )
    np.testing.assert_allclose(np.asarray(loss), fixture["output/loss"], atol=1e-4, rtol=0)


def test_training_checkpoint_with_value_keys_and_bfloat16(tmp_path, openpi_fixture):
    """openpi's training writes nnx.State leaves (`.../value`) and frozen weights in bf16."""
    fixture = openpi_fixture("pi0")
    params = load_openpi_params(fixture.path)
    flat = {}
    for key, value in params.items():
        if key.startswith("PaliGemma/llm"):  # openpi's LoRA-frozen set is stored in bf16
            value = value.astype(ml_dtypes.bfloat16)
        flat[f"{key}/value"] = value
    _write_orbax(tmp_path / "params", flat)
    loaded = load_openpi_params(tmp_path / "params")
    assert set(loaded) == set(params)
    # Kept as stored (a released bf16 tree is held once, in half float32's memory).
    dtypes = {k: v.dtype.name for k, v in loaded.items()}
    assert {dtypes[k] for k in loaded if k.startswith("PaliGemma/llm")} == {"bfloat16"}
    assert {dtypes[k] for k in loaded if not k.startswith("PaliGemma/llm")} == {"float32"}
    embedding = "PaliGemma/llm/embedder/input_embedding"
    np.testing.assert_array_equal(loaded[embedding], params[embedding].astype(ml_dtypes.bfloat16))
    model = pi0_from_openpi(tmp_path, action_horizon=10, max_token_len=16)
    error = np.abs(_sample(model, fixture) - fixture["output/sampled"]).max()
    assert error < 5e-2  # bf16 rounding of the Gemma weights only


def test_npz_with_and_without_params_prefix(tmp_path, openpi_fixture):
    fixture = openpi_fixture("pi05")
    params = load_openpi_params(fixture.path)
    np.savez(tmp_path / "plain.npz", **params)
    plain = load_openpi_params(tmp_path / "plain.npz")
    assert set(plain) == set(params) and len(params) == 51
    config = pi0_config_from_params(plain)
    assert config["pi05"] is True
    assert config["paligemma_variant"] == dict(
        width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16
    )
    assert config["vision_variant"] == dict(
        width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=16
    )
    assert config["vocabulary_size"] == 1024 and config["action_dim"] == 8
    assert config["image_resolution"] == (224, 224)


def test_missing_weight_fails_and_writes_nothing(tmp_path, openpi_fixture):
    params = load_openpi_params(openpi_fixture("pi0").path)
    del params["PaliGemma/llm/layers/mlp_1/linear"]
    np.savez(tmp_path / "broken.npz", **params)
    output = tmp_path / "out.keras"
    with pytest.raises(ValueError, match="PaliGemma/llm/layers/mlp_1/linear"):
        pi0_from_openpi(tmp_path / "broken.npz", action_horizon=10)
    code = cli(["convert", "openpi", str(tmp_path / "broken.npz"), "--model", "pi0",
                "--action-horizon", "10", "--output", str(output)])
    assert code == 2
    assert os.listdir(tmp_path) == ["broken.npz"]


def test_wrong_shape_names_path_and_both_shapes(tmp_path, openpi_fixture, capsys):
    params = load_openpi_params(openpi_fixture("pi0").path)
    params["state_proj/bias"] = np.zeros((65,), np.float32)
    np.savez(tmp_path / "bad.npz", **params)
    code = cli(["convert", "openpi", str(tmp_path / "bad.npz"), "--model", "pi0",
                "--action-horizon", "10", "--output", str(tmp_path / "out.keras")])
    message = capsys.readouterr().err
    assert code == 2
    assert "'state_proj/bias'" in message and "(65,)" in message and "(64,)" in message
    assert not (tmp_path / "out.keras").exists()


def test_model_flag_must_match_checkpoint(openpi_fixture):
    with pytest.raises(ValueError, match="holds a pi0 model"):
        pi0_from_openpi(openpi_fixture("pi0").path, action_horizon=10, model="pi05")


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No openpi checkpoint"):
        load_openpi_params(tmp_path / "nowhere")
