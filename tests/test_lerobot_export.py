"""LeRobot export: exact round trips here, and LeRobot 0.6.1 itself (in .venv-lerobot) running the exported files."""

import json

import keras
import numpy as np
import pytest

from keras_openpi.cli import main as cli
from keras_openpi.convert import export_lerobot
from keras_openpi.convert import pi0_from_lerobot
from keras_openpi.convert.safetensors_io import SafetensorsReader

from lerobot_checkpoints import FIXTURE
from lerobot_checkpoints import reference
from lerobot_checkpoints import run_lerobot
from lerobot_checkpoints import sample_and_loss

# The fixture's tiny dimensions are no LeRobot variant: name the variants they stand for.
TINY = dict(paligemma_variant="gemma_2b", action_expert_variant="gemma_300m")


def _same_weights(a, b):
    for x, y in zip(a.weights, b.weights, strict=True):
        assert x.path == y.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y), err_msg=x.path)


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_round_trip_is_exact_and_tensors_are_lerobots(name, tmp_path):
    model = pi0_from_lerobot(FIXTURE / name)
    export_lerobot(model, tmp_path / "out", **TINY)
    _same_weights(pi0_from_lerobot(tmp_path / "out"), model)
    with SafetensorsReader(FIXTURE / name / "model.safetensors") as original, SafetensorsReader(
        tmp_path / "out" / "model.safetensors"
    ) as exported:
        assert sorted(exported.keys()) == sorted(original.keys())
        for key in original.keys():
            assert exported.shape(key) == original.shape(key) and exported.dtype(key) == "float32", key
            if "lm_head" not in key:  # LeRobot's unused heads: tied / zeros on export
                np.testing.assert_array_equal(exported.get(key), original.get(key), err_msg=key)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["type"], config["chunk_size"], config["max_action_dim"]) == (name, 5, 8)


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_lerobot_reproduces_keras_actions(name, tmp_path):
    """LeRobot's from_pretrained on the exported files samples keras_openpi's actions (1e-4)."""
    model = pi0_from_lerobot(FIXTURE / name)
    # Change the weights so that LeRobot can only match by reading the export.
    rng = np.random.default_rng(1)
    for weight in model.weights:
        if "seed_generator" not in weight.path:
            weight.assign(keras.ops.convert_to_numpy(weight) + rng.normal(0, 0.02, weight.shape).astype("float32"))
    export_lerobot(model, tmp_path / "out", **TINY)
    ref = reference(name)
    sampled, loss = sample_and_loss(model, ref)
    run_lerobot("run", tmp_path / "out", FIXTURE / name / "reference.npz", tmp_path / "lerobot.npz")
    with np.load(tmp_path / "lerobot.npz") as lerobot:
        np.testing.assert_allclose(lerobot["sampled"], sampled, atol=1e-4, rtol=0)
        np.testing.assert_allclose(lerobot["loss"].mean(-1), loss, atol=1e-4, rtol=0)
    assert np.abs(sampled - ref["output/sampled"]).max() > 1e-2  # the changed weights mattered


def test_reference_script_makes_the_committed_fixture(tmp_path):
    """The committed fixture is what the script makes with LeRobot 0.6.1."""
    run_lerobot("make", tmp_path)
    for name in ("pi0", "pi05"):
        with np.load(tmp_path / name / "reference.npz") as made:
            committed = reference(name)
            assert sorted(made.files) == sorted(committed)
            for key in made.files:
                np.testing.assert_allclose(made[key], committed[key], atol=1e-6, rtol=0, err_msg=key)
        with SafetensorsReader(tmp_path / name / "model.safetensors") as made, SafetensorsReader(
            FIXTURE / name / "model.safetensors"
        ) as committed:
            assert sorted(made.keys()) == sorted(committed.keys())
            for key in made.keys():
                np.testing.assert_array_equal(made.get(key), committed.get(key), err_msg=key)


def test_dimensions_lerobot_cannot_build_are_refused(tmp_path):
    model = pi0_from_lerobot(FIXTURE / "pi0")
    with pytest.raises(ValueError, match="LeRobot's SigLIP is So400m/14"):
        export_lerobot(model, tmp_path / "out")
    with pytest.raises(ValueError, match="builds its action_expert_variant from a variant name"):
        export_lerobot(model, tmp_path / "out", paligemma_variant="gemma_2b")
    assert not list(tmp_path.iterdir())


def test_cli_export_lerobot_refuses_existing_output_and_pi0_fast(tmp_path, openpi_fixture, capsys):
    model = pi0_from_lerobot(FIXTURE / "pi0")
    model.save(tmp_path / "m.keras")
    (tmp_path / "out").mkdir()
    assert cli(["export", "lerobot", str(tmp_path / "m.keras"), "--output", str(tmp_path / "out")]) == 2
    assert "exists" in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir())
    # The tiny model has no LeRobot variant's dimensions: refused, nothing written.
    assert cli(["export", "lerobot", str(tmp_path / "m.keras"), "--output", str(tmp_path / "o2")]) == 2
    assert "So400m/14" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.partial").exists()
    from keras_openpi.convert import pi0_fast_from_openpi

    fast = pi0_fast_from_openpi(openpi_fixture("pi0_fast").path, action_dim=6, action_horizon=5, max_token_len=24)
    with pytest.raises(ValueError, match="π0 / π0.5 model, got Pi0Fast"):
        export_lerobot(fast, tmp_path / "o3")
