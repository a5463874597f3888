"""LeRobot / openpi-PyTorch π0 and π0.5 import against LeRobot 0.6.1's own outputs (tests/fixtures/lerobot)."""

import json
import os

import numpy as np
import pytest

from keras_openpi.cli import main as cli
from keras_openpi.convert import pi0_from_lerobot
from keras_openpi.convert.safetensors_io import SafetensorsReader
from keras_openpi.convert.safetensors_io import write_safetensors

from lerobot_checkpoints import FIXTURE
from lerobot_checkpoints import copy_fixture
from lerobot_checkpoints import reference
from lerobot_checkpoints import sample_and_loss

ATOL = 1e-4


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def imported(request):
    return request.param, pi0_from_lerobot(FIXTURE / request.param)


def test_matches_lerobot_actions_and_loss(imported):
    name, model = imported
    ref = reference(name)
    sampled, loss = sample_and_loss(model, ref)
    assert sampled.shape == ref["output/sampled"].shape == (2, 5, 8)
    np.testing.assert_allclose(sampled, ref["output/sampled"], atol=ATOL, rtol=0)
    # LeRobot's loss is per element (B, H, D); openpi's and keras_openpi's average D.
    np.testing.assert_allclose(loss, ref["output/loss"].mean(-1), atol=ATOL, rtol=0)


def test_architecture_comes_from_config_and_weights(imported):
    name, model = imported
    assert model.pi05 == (name == "pi05")
    assert (model.action_horizon, model.action_dim, model.max_token_len) == (5, 8, 8)
    assert model.image_keys == ("base_0_rgb", "left_wrist_0_rgb")
    assert model.image_resolution == (32, 32)
    assert model.vocabulary_size == 512
    assert model.paligemma_variant["width"] == 32 and model.action_expert_variant["width"] == 16


def test_flags_override_the_config():
    model = pi0_from_lerobot(FIXTURE / "pi0", action_horizon=7, max_token_len=12, model="pi0")
    assert (model.action_horizon, model.max_token_len) == (7, 12)


def test_cli_convert_lerobot(tmp_path):
    output = tmp_path / "pi05.keras"
    assert cli(["convert", "lerobot", str(FIXTURE / "pi05"), "--output", str(output)]) == 0
    import keras

    model = keras.saving.load_model(output)
    sampled, _ = sample_and_loss(model, reference("pi05"))
    np.testing.assert_allclose(sampled, reference("pi05")["output/sampled"], atol=ATOL, rtol=0)
    # An output that exists is refused and left as it was.
    size = os.path.getsize(output)
    assert cli(["convert", "lerobot", str(FIXTURE / "pi05"), "--output", str(output)]) == 2
    assert os.path.getsize(output) == size


def _rewrite(directory, edit):
    """Rewrites `model.safetensors` with `edit(dict of arrays)` applied (names keep LeRobot's prefix)."""
    path = directory / "model.safetensors"
    with SafetensorsReader(path) as reader:
        tensors = {k: reader.get(k) for k in reader.keys()}
    edit(tensors)
    os.remove(path)
    write_safetensors(
        path, [(k, str(v.dtype), v.shape, lambda v=v: v) for k, v in sorted(tensors.items())]
    )


Q_PROJ = "model.paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight"


def test_missing_tensor_is_named_and_nothing_is_written(tmp_path, capsys):
    source = copy_fixture("pi0", tmp_path / "src")
    _rewrite(source, lambda t: t.pop(Q_PROJ))
    output = tmp_path / "out.keras"
    assert cli(["convert", "lerobot", str(source), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "has no tensor 'paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight'" in err
    assert "(64, 16)" in err
    assert not list(tmp_path.glob("out*"))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    source = copy_fixture("pi0", tmp_path / "src")
    _rewrite(source, lambda t: t.update({Q_PROJ: np.zeros((64, 12), np.float32)}))
    with pytest.raises(ValueError, match=r"q_proj.weight' has shape \(64, 12\), but .* needs \(64, 16\)"):
        pi0_from_lerobot(source)


def test_config_that_contradicts_the_weights(tmp_path):
    source = copy_fixture("pi0", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(config, type="pi05")))
    with pytest.raises(ValueError, match="type 'pi05', but the weights are a π0 model"):
        pi0_from_lerobot(source)
    (source / "config.json").write_text(json.dumps(dict(config, max_action_dim=32)))
    with pytest.raises(ValueError, match=r"max_action_dim 32, but tensor 'action_in_proj.weight' has shape \(16, 8\)"):
        pi0_from_lerobot(source)
    (source / "config.json").write_text(json.dumps(dict(config, image_resolution=[48, 48])))
    with pytest.raises(ValueError, match="image_resolution \\[48, 48\\] does not fit"):
        pi0_from_lerobot(source)
    with pytest.raises(ValueError, match="holds a pi0 model"):
        pi0_from_lerobot(FIXTURE / "pi0", model="pi05")


def test_state_width_other_than_action_width_is_refused(tmp_path):
    source = copy_fixture("pi0", tmp_path / "src")
    _rewrite(source, lambda t: t.update({"model.state_proj.weight": np.zeros((16, 6), np.float32)}))
    with pytest.raises(ValueError, match=r"'state_proj.weight' has shape \(16, 6\) and 'action_in_proj.weight' \(16, 8\)"):
        pi0_from_lerobot(source)


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
        pi0_from_lerobot(tmp_path / "nowhere")
    source = copy_fixture("pi0", tmp_path / "src")
    (source / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pi0_from_lerobot(source)
    os.remove(source / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        pi0_from_lerobot(source)


def test_openpi_pytorch_layout(tmp_path):
    """openpi's convert_jax_model_to_pytorch.py: no `model.` prefix, its own config.json."""
    source = tmp_path / "pi05_pytorch"
    source.mkdir()
    with SafetensorsReader(FIXTURE / "pi05" / "model.safetensors") as reader:
        tensors = [
            (k[len("model.") :], reader.dtype(k), reader.shape(k), lambda k=k: reader.get(k))
            for k in sorted(reader.keys())
        ]
        write_safetensors(source / "model.safetensors", tensors)
    (source / "config.json").write_text(
        json.dumps(
            {"action_dim": 8, "action_horizon": 5, "paligemma_variant": "gemma_2b",
             "action_expert_variant": "gemma_300m", "precision": "float32"}
        )
    )
    model = pi0_from_lerobot(
        source, layout="openpi-pytorch", max_token_len=8, image_keys=("base_0_rgb", "left_wrist_0_rgb")
    )
    assert model.image_resolution == (32, 32)
    assert model.pi05 and model.action_horizon == 5
    ref = reference("pi05")
    sampled, _ = sample_and_loss(model, ref)
    np.testing.assert_allclose(sampled, ref["output/sampled"], atol=ATOL, rtol=0)


def test_bfloat16_tensors_are_read(tmp_path):
    import ml_dtypes

    path = tmp_path / "x.safetensors"
    value = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    write_safetensors(path, [("model.w", "bfloat16", (2, 3), lambda: value)])
    with SafetensorsReader(path, strip_prefix="model.") as reader:
        assert reader.keys() == ["w"] and reader.dtype("w") == "bfloat16"
        np.testing.assert_array_equal(reader.get("w"), value)
