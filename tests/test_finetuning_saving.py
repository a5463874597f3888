"""LoRA models through `.keras`, `.weights.h5`, adapter files and `merge_lora`."""

import keras
import numpy as np
import pytest
from finetuning_helpers import NO_GRADIENT
from finetuning_helpers import check_two_steps
from finetuning_helpers import fit_two_steps
from finetuning_helpers import fixed_velocity
from finetuning_helpers import randomize_adapters
from finetuning_helpers import snapshot
from finetuning_helpers import tiny_pi0

RANK = {"vlm": 4, "action_expert": 2}
ALPHA = {"vlm": 8, "action_expert": 3}  # alpha != rank: a lost alpha would show


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA model after two fit steps (adapters non-zero), saved as `.keras`."""
    model = tiny_pi0()
    model.apply_strategy("lora", rank=RANK, alpha=ALPHA, freeze_vision=True)
    fit_two_steps(model)
    path = tmp_path_factory.mktemp("lora") / "pi0_lora.keras"
    model.save(path)
    return model, path


def lora_layers(model):
    return [l for l in model._flatten_layers() if getattr(l, "lora_enabled", False)]


def test_keras_file_keeps_adapters_rank_alpha_and_flags(trained):
    model, path = trained
    reloaded = keras.saving.load_model(path)
    before, after = snapshot(model), snapshot(reloaded)
    assert sorted(before) == sorted(after)
    for name, (value, trainable) in before.items():
        np.testing.assert_array_equal(after[name][0], value, err_msg=name)
        assert after[name][1] == trainable, name
    adapters = [v for v in reloaded.weights if v.name == "lora_kernel_b"]
    trained_adapters = [v for v in adapters if not NO_GRADIENT.fullmatch(v.path.removeprefix("pi0/"))]
    assert len(adapters) == 2 * 7 * 2 and len(trained_adapters) == len(adapters) - 5
    assert all(np.abs(v.numpy()).max() > 0 for v in trained_adapters)  # not zeroed on load
    for original, loaded in zip(lora_layers(model), lora_layers(reloaded), strict=True):
        assert (loaded.path, loaded.lora_rank, loaded.lora_alpha) == (
            original.path, original.lora_rank, original.lora_alpha,
        )
    dense = reloaded.gemma.decoder_blocks[0].experts[1].feed_forward.gate
    assert isinstance(dense, keras.layers.Dense) and (dense.lora_rank, dense.lora_alpha) == (2, 3.0)
    assert reloaded.finetuning_state == model.finetuning_state
    config = reloaded.get_config()["finetuning"]
    assert config["lora"] == {"vlm": {"rank": 4, "alpha": 8.0}, "action_expert": {"rank": 2, "alpha": 3.0}}
    assert "vision_encoder/patch_embedding/kernel" in config["frozen_weights"]
    np.testing.assert_array_equal(fixed_velocity(reloaded), fixed_velocity(model))


def test_reloaded_model_resumes_training(trained):
    _, path = trained
    reloaded = keras.saving.load_model(path)
    before = snapshot(reloaded)
    fit_two_steps(reloaded)  # a new optimizer: compile() makes a fresh Adam
    check_two_steps(reloaded, before)
    after = snapshot(reloaded)
    moved = [
        name for name, (value, _) in before.items()
        if "lora_kernel" in name and not np.array_equal(value, after[name][0])
    ]
    assert len(moved) == 2 * 7 * 2 * 2 - 10  # all but the last VLM block's gradient-free ones


def test_weights_h5_round_trip(trained, tmp_path):
    model, _ = trained
    model.save_weights(tmp_path / "lora.weights.h5")
    twin = tiny_pi0()
    twin.apply_strategy("lora", rank=RANK, alpha=ALPHA, freeze_vision=True)
    twin.load_weights(tmp_path / "lora.weights.h5")
    for name, (value, _) in snapshot(model).items():
        np.testing.assert_array_equal(snapshot(twin)[name][0], value, err_msg=name)


def test_keras_own_lora_loses_adapters(tmp_path):
    """Why the save hook exists: Keras 3.15 merges on save and zeroes A and B on load."""
    layer = keras.layers.EinsumDense("btd,ndh->btnh", (None, 2, 4))
    layer.build((None, None, 8))
    layer.enable_lora(2)
    layer.lora_kernel_b.assign(np.ones((2, 4), "float32"))
    store = {}
    layer.save_own_variables(store)
    layer.load_own_variables(store)
    assert np.abs(layer.lora_kernel_a.numpy()).max() == 0
    assert np.abs(layer.lora_kernel_b.numpy()).max() == 0


def test_lora_weights_file_round_trip(tmp_path):
    base = tiny_pi0()
    base_weights = base.get_weights()
    base.apply_strategy("lora", rank=RANK, alpha=ALPHA, freeze_vision=True)
    randomize_adapters(base)
    path = tmp_path / "adapters.npz"
    base.save_lora_weights(path)
    with np.load(path) as data:
        saved = sorted(k for k in data.files if k != "__meta__")
    assert saved == sorted(v.path.removeprefix("pi0/") for v in base.trainable_weights)
    assert path.stat().st_size < 0.5 * 4 * base.count_params()

    fresh = tiny_pi0()  # e.g. a freshly converted openpi base model
    fresh.set_weights(base_weights)
    fresh.load_lora_weights(path)  # re-creates the adapters and the frozen set
    assert fresh.finetuning_state.lora == base.finetuning_state.lora
    assert {v.path for v in fresh.trainable_weights} == {v.path for v in base.trainable_weights}
    np.testing.assert_array_equal(fixed_velocity(fresh), fixed_velocity(base))

    other_rank = tiny_pi0()
    other_rank.enable_lora(rank=2)
    with pytest.raises(ValueError, match="holds LoRA .*\"rank\": 4.* the model has .*\"rank\": 2"):
        other_rank.load_lora_weights(path)
    other_size = tiny_pi0(action_dim=6)
    with pytest.raises(ValueError, match="'action_in_proj/kernel' has shape \\(4, 16\\), the model's weight has shape \\(6, 16\\)"):
        other_size.load_lora_weights(path)
    vision_trains = tiny_pi0()
    vision_trains.apply_strategy("lora", rank=RANK, alpha=ALPHA)
    vision_trains.save_lora_weights(tmp_path / "vision.npz")
    with pytest.raises(ValueError, match="does not match the trainable weights .* 0 missing from the file .* not trainable in the model"):
        base.load_lora_weights(tmp_path / "vision.npz")
    np.savez(tmp_path / "plain.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a keras_openpi LoRA weights file"):
        base.load_lora_weights(tmp_path / "plain.npz")


@pytest.mark.parametrize("pi05", [False, True], ids=["pi0", "pi05"])
def test_merge_lora_parity(pi05, tmp_path):
    model = tiny_pi0(pi05=pi05)
    model.enable_lora(rank=RANK, alpha=ALPHA)
    randomize_adapters(model)
    lora_velocity = fixed_velocity(model)
    merged = model.merge_lora()
    assert merged is model and lora_layers(model) == []
    assert not any("lora" in v.path for v in model.weights)
    np.testing.assert_allclose(fixed_velocity(model), lora_velocity, atol=1e-5, rtol=0)
    assert model.get_config()["finetuning"]["lora"] == {}
    model.save(tmp_path / "merged.keras")
    reloaded = keras.saving.load_model(tmp_path / "merged.keras")
    np.testing.assert_allclose(fixed_velocity(reloaded), lora_velocity, atol=1e-5, rtol=0)
