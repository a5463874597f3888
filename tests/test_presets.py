"""keras-hub presets of π0 and π0-FAST: layout, LoRA round trips, tokenizers, errors, the CLI."""

import json
import os

import h5py
import keras
import numpy as np
import pytest

from conftest import fixture_path
from finetuning_helpers import NO_GRADIENT
from finetuning_helpers import check_two_steps
from finetuning_helpers import fit_two_steps
from finetuning_helpers import fixed_velocity
from finetuning_helpers import snapshot
from finetuning_helpers import tiny_pi0
from keras_openpi.cli import main as cli
from keras_openpi.models import PaliGemmaPolicy
from keras_openpi.models import Pi0
from keras_openpi.models import Pi0Fast
from keras_openpi.tokenizers import FASTPromptTokenizer
from keras_openpi.tokenizers import FASTTokenizer
from keras_openpi.tokenizers import PaliGemmaTokenizer
from test_fast_prompt import NUM_LOC
from test_fast_prompt import train_sentencepiece
from test_pi0_fast_model import DIM
from test_pi0_fast_model import HORIZON
from test_pi0_fast_model import LENGTH
from test_pi0_fast_model import STATE
from test_pi0_fast_model import random_observation
from test_pi0_fast_model import tiny_fast

keras_hub = pytest.importorskip("keras_hub")
from keras_hub.src.utils import preset_utils  # noqa: E402

RANK = {"vlm": 4, "action_expert": 2}
ALPHA = {"vlm": 8, "action_expert": 3}  # alpha != rank: a lost alpha would show
PROMPTS = ["pick up the cup", "Put the towel_in the basket", "open the drawer\n"]


def listing(directory):
    """Every file under `directory`, relative, sorted."""
    return sorted(
        os.path.relpath(os.path.join(root, name), directory)
        for root, _, names in os.walk(directory)
        for name in names
    )


def sample(model, seed=4):
    """Sampled actions from a fixed observation and noise."""
    observation = model.dummy_observation(batch_size=2)
    rng = np.random.default_rng(seed)
    observation["state"] = rng.normal(size=(2, model.action_dim)).astype("float32")
    noise = rng.normal(size=(2, model.action_horizon, model.action_dim)).astype("float32")
    return np.asarray(model.sample_actions(observation, noise=noise, num_steps=2))


@pytest.fixture(scope="module")
def sentencepiece_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tiny_paligemma.model"
    path.write_bytes(train_sentencepiece(with_locations=True))
    return path


@pytest.fixture(scope="module")
def lora_preset(tmp_path_factory, sentencepiece_path):
    """A π0 after two LoRA fit steps (adapters non-zero), as a preset with its prompt tokenizer."""
    model = tiny_pi0()
    model.apply_strategy("lora", rank=RANK, alpha=ALPHA, freeze_vision=True)
    fit_two_steps(model)
    tokenizer = PaliGemmaTokenizer(sentencepiece_path, max_len=32)
    directory = tmp_path_factory.mktemp("presets") / "pi0_lora"
    model.save_to_preset(directory, tokenizer=tokenizer)
    return model, directory, tokenizer


@pytest.fixture(scope="module")
def fast_model(sentencepiece_path):
    """A tiny π0-FAST carrying a FAST prompt tokenizer."""
    rng = np.random.default_rng(1)
    chunks = rng.uniform(-0.5, 0.5, (200, 1, DIM)) + np.cumsum(
        rng.normal(0.0, 0.04, (200, HORIZON, DIM)), axis=1
    )
    fast = FASTTokenizer(vocab_size=NUM_LOC).fit(chunks)
    tokenizer = FASTPromptTokenizer(sentencepiece_path, fast, max_len=LENGTH)
    return tiny_fast(eos_token_id=-1, tokenizer=tokenizer), chunks[1]


# === π0: layout, LoRA, training on ===


def test_layout_is_keras_hubs(lora_preset, sentencepiece_path):
    model, directory, tokenizer = lora_preset
    assert listing(directory) == [
        "assets/tokenizer/vocabulary.spm",
        "config.json",
        "metadata.json",
        "model.weights.h5",
        "tokenizer.json",
    ]
    config = json.loads((directory / "config.json").read_text())
    assert config["registered_name"] == "keras_openpi>Pi0"
    assert config["config"]["finetuning"]["lora"] == {
        "vlm": {"rank": 4, "alpha": 8.0},
        "action_expert": {"rank": 2, "alpha": 3.0},
    }
    assert "build_config" not in config and "compile_config" not in config
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["parameter_count"] == model.count_params()
    assert (metadata["keras_version"], metadata["keras_hub_version"], metadata["tasks"]) == (
        keras.version(), keras_hub.__version__, [],
    )  # fmt: skip
    tokenizer_config = json.loads((directory / "tokenizer.json").read_text())
    assert tokenizer_config["registered_name"] == "keras_hub>PaliGemmaTokenizer"
    spm = directory / "assets/tokenizer/vocabulary.spm"
    assert spm.read_bytes() == sentencepiece_path.read_bytes()
    preset_utils._validate_backbone(str(directory))  # what keras_hub.upload_preset checks
    reread = PaliGemmaTokenizer.from_preset(directory, max_len=32)
    for prompt in PROMPTS:
        for got, expected in zip(reread.tokenize(prompt), tokenizer.tokenize(prompt)):
            np.testing.assert_array_equal(got, expected)


def test_lora_rank_alpha_and_flags_survive_as_in_keras_files(lora_preset, tmp_path):
    model, directory, _ = lora_preset
    reloaded = Pi0.from_preset(directory)
    model.save(tmp_path / "pi0_lora.keras")
    from_keras_file = keras.saving.load_model(tmp_path / "pi0_lora.keras")
    before, after, keras_file = snapshot(model), snapshot(reloaded), snapshot(from_keras_file)
    assert sorted(after) == sorted(before) == sorted(keras_file)
    for name, (value, trainable) in before.items():
        np.testing.assert_array_equal(after[name][0], value, err_msg=name)
        assert after[name][1] == trainable == keras_file[name][1], name
    adapters = [v for v in reloaded.weights if v.name == "lora_kernel_b"]
    assert len(adapters) == 2 * 7 * 2
    assert sum(np.abs(v.numpy()).max() > 0 for v in adapters) == len(adapters) - 5  # not zeroed
    lora = [layer for layer in reloaded._flatten_layers() if getattr(layer, "lora_enabled", False)]
    assert sorted({(layer.lora_rank, layer.lora_alpha) for layer in lora}) == [(2, 3.0), (4, 8.0)]
    assert reloaded.finetuning_state == model.finetuning_state == from_keras_file.finetuning_state
    assert reloaded.get_config() == model.get_config() == from_keras_file.get_config()
    np.testing.assert_array_equal(fixed_velocity(reloaded), fixed_velocity(model))
    # A preset holds no compile config (keras-hub drops it); `fit_two_steps` compiled the
    # model to run eagerly, so the reloaded one samples eagerly too, for bit-equal actions.
    assert not reloaded.compiled and from_keras_file.run_eagerly
    reloaded.run_eagerly = True
    np.testing.assert_array_equal(sample(reloaded), sample(model))


def test_reloaded_preset_resumes_training(lora_preset):
    _, directory, _ = lora_preset
    reloaded = Pi0.from_preset(directory)
    before = snapshot(reloaded)
    fit_two_steps(reloaded)
    check_two_steps(reloaded, before)  # frozen weights bit-identical, trainable ones moved
    after = snapshot(reloaded)
    moved = [
        name for name, (value, _) in before.items()
        if "lora_kernel" in name and not np.array_equal(value, after[name][0])
    ]  # fmt: skip
    assert len(moved) == 2 * 7 * 2 * 2 - 10  # all but the last VLM block's gradient-free ones
    assert not any(NO_GRADIENT.fullmatch(name) for name in moved)


def test_openpi_form_lora_survives(tmp_path):
    """LoRA in openpi's form (`--keep-lora`, `form="openpi"`) reloads in that form, values equal."""
    model = tiny_pi0()
    model.apply_strategy("lora", rank=RANK, alpha=ALPHA, form="openpi")
    for variable in model.weights:  # non-zero adapters, so that a lost one would show
        if "lora_kernel_b" in variable.path:
            variable.assign(np.full(variable.shape, 0.01, variable.dtype))
    model.save_to_preset(tmp_path / "openpi_lora")
    reloaded = Pi0.from_preset(tmp_path / "openpi_lora")
    assert reloaded.get_config() == model.get_config()
    assert reloaded.finetuning_state == model.finetuning_state
    before, after = snapshot(model), snapshot(reloaded)
    assert sorted(after) == sorted(before)
    for name, (value, trainable) in before.items():
        np.testing.assert_array_equal(after[name][0], value, err_msg=name)
        assert after[name][1] == trainable, name
    np.testing.assert_array_equal(fixed_velocity(reloaded), fixed_velocity(model))


# === π0-FAST: the carried tokenizer ===


def test_pi0_fast_preset_carries_its_tokenizer(fast_model, tmp_path):
    model, chunk = fast_model
    directory = tmp_path / "pi0_fast"
    model.save_to_preset(directory)
    assert listing(directory) == [
        "assets/tokenizer/fast/fast_processor.py",
        "assets/tokenizer/fast/processor_config.json",
        "assets/tokenizer/fast/special_tokens_map.json",
        "assets/tokenizer/fast/tokenizer.json",
        "assets/tokenizer/fast/tokenizer_config.json",
        "assets/tokenizer/paligemma_tokenizer.model",
        "config.json",
        "metadata.json",
        "model.weights.h5",
        "tokenizer.json",
    ]
    tokenizer_config = json.loads((directory / "tokenizer.json").read_text())
    assert tokenizer_config["registered_name"] == "keras_openpi>FASTPromptTokenizerLayer"
    reloaded = PaliGemmaPolicy.from_preset(directory)
    assert type(reloaded) is Pi0Fast
    original, carried = model.tokenizer.tokenizer, reloaded.tokenizer.tokenizer
    assert carried.fast_tokenizer.get_config() == original.fast_tokenizer.get_config()
    for got, expected in zip(
        carried.tokenize("pick up the cup", STATE, chunk),
        original.tokenize("pick up the cup", STATE, chunk),
    ):
        np.testing.assert_array_equal(got, expected)
    observation = random_observation(model)
    np.testing.assert_array_equal(
        np.asarray(reloaded.generate(observation, max_decoding_steps=4)),
        np.asarray(model.generate(observation, max_decoding_steps=4)),
    )
    np.testing.assert_array_equal(
        np.asarray(reloaded.token_loss(observation)), np.asarray(model.token_loss(observation))
    )
    with pytest.raises(ValueError, match="Pi0Fast carries its tokenizer .*; pass no 'tokenizer'"):
        model.save_to_preset(tmp_path / "other", tokenizer=original)
    assert not (tmp_path / "other").exists()


def test_pi0_fast_without_tokenizer_and_class_checks(tmp_path):
    model = tiny_fast()
    model.save_to_preset(tmp_path / "bare")
    assert "tokenizer.json" not in os.listdir(tmp_path / "bare")
    reloaded = Pi0Fast.from_preset(tmp_path / "bare")
    assert reloaded.tokenizer.tokenizer is None
    with pytest.raises(ValueError, match=f"the preset {tmp_path / 'bare'} holds a Pi0Fast, not a Pi0."):
        Pi0.from_preset(tmp_path / "bare")
    # keras-hub's own message: the policies are not keras-hub Backbones.
    with pytest.raises(
        ValueError,
        match="Saved preset has type `Pi0Fast` which is not a subclass of calling class "
        "`Backbone`. Call `from_preset` directly on `Pi0Fast` instead.",
    ):
        keras_hub.models.Backbone.from_preset(str(tmp_path / "bare"))


# === Shards, dtype, replacing, errors ===


def test_sharded_weights_dtype_and_fresh_weights(tmp_path):
    model = tiny_pi0()
    model.save_to_preset(tmp_path / "sharded", max_shard_size=1e-4)  # 100 kB shards
    files = listing(tmp_path / "sharded")
    assert "model.weights.json" in files and "model.weights.h5" not in files
    assert sum(f.startswith("model_") and f.endswith(".weights.h5") for f in files) > 1
    reloaded = Pi0.from_preset(tmp_path / "sharded")
    np.testing.assert_array_equal(sample(reloaded), sample(model))
    assert reloaded.dtype_policy.name == "float32"
    mixed = Pi0.from_preset(tmp_path / "sharded", dtype="mixed_bfloat16", augment=True)
    assert (mixed.dtype_policy.name, mixed.augment) == ("mixed_bfloat16", True)
    assert np.abs(sample(mixed) - sample(model)).max() < 5e-2
    fresh = Pi0.from_preset(tmp_path / "sharded", load_weights=False)
    assert fresh.get_config() == model.get_config()
    kernel = "action_out_proj/kernel"
    assert not np.array_equal(snapshot(fresh)[kernel][0], snapshot(model)[kernel][0])


def test_saving_replaces_a_preset_and_nothing_else(fast_model, tmp_path):
    fast, _ = fast_model
    directory = tmp_path / "policy"
    fast.save_to_preset(directory)
    tiny_pi0().save_to_preset(directory)  # a π0 over a π0-FAST: no stale tokenizer stays
    assert listing(directory) == ["config.json", "metadata.json", "model.weights.h5"]
    assert type(PaliGemmaPolicy.from_preset(directory, load_weights=False)) is Pi0
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"policy holds files that are not a preset's \(notes.txt\)"):
        tiny_pi0().save_to_preset(directory)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file is a file; a preset is a directory"):
        tiny_pi0().save_to_preset(tmp_path / "a_file")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "policy"]  # no partial directory left
    assert listing(directory) == ["config.json", "metadata.json", "model.weights.h5", "notes.txt"]


def test_loading_errors_name_the_preset(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"the preset {missing} does not exist; expected a"):
        Pi0.from_preset(missing)
    backbone = keras_hub.models.PaliGemmaBackbone(
        vocabulary_size=32, image_size=28, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8,
        vit_patch_size=14, vit_num_heads=2, vit_hidden_dim=8, vit_num_layers=1,
        vit_intermediate_dim=16,
    )  # fmt: skip
    backbone.save_to_preset(str(tmp_path / "paligemma"))
    with pytest.raises(
        ValueError,
        match="holds a PaliGemmaBackbone, not a Pi0; start a policy from it with "
        "Pi0.from_paligemma",
    ):
        Pi0.from_preset(tmp_path / "paligemma")
    directory = tmp_path / "pi0"
    tiny_pi0().save_to_preset(directory)
    weights = directory / "model.weights.h5"
    with h5py.File(weights, "r+") as file:
        kernel = file["action_in_proj/vars/0"]
        kernel[0, 0] = np.nan
    with pytest.raises(ValueError, match=rf"{directory}: weight 'pi0/action_in_proj/kernel' holds NaN"):
        Pi0.from_preset(directory)
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(
        ValueError,
        match=f"cannot load the preset {directory}: its model.weights.h5 is missing or damaged "
        r"\(OSError: Unable to synchronously open file \(truncated file",
    ):
        Pi0.from_preset(directory)
    weights.unlink()
    with pytest.raises(ValueError, match=r"it has no model.weights.h5 \(nor model.weights.json of"):
        Pi0.from_preset(directory)
    assert type(Pi0.from_preset(directory, load_weights=False)) is Pi0
    (directory / "config.json").write_text('{"registered_name": "keras_openpi>Pi0", ')
    with pytest.raises(
        ValueError,
        match=f"cannot load the preset {directory}: its config.json is missing or damaged "
        r"\(JSONDecodeError: ",
    ):
        Pi0.from_preset(directory)


def test_damaged_tokenizer_files_are_named(fast_model, tmp_path):
    model, _ = fast_model
    directory = tmp_path / "pi0_fast"
    model.save_to_preset(directory)
    assets = directory / "assets/tokenizer"
    (assets / "paligemma_tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(
        ValueError,
        match=f"the preset {directory}: its assets/tokenizer/paligemma_tokenizer.model is missing "
        r"or damaged \(RuntimeError: ",
    ):
        Pi0Fast.from_preset(directory)
    (assets / "paligemma_tokenizer.model").unlink()
    with pytest.raises(
        ValueError,
        match="its assets/tokenizer/paligemma_tokenizer.model is missing or damaged "
        r"\(FileNotFoundError: `assets/tokenizer/paligemma_tokenizer.model` doesn't exist",
    ):
        Pi0Fast.from_preset(directory)
    model.save_to_preset(directory)
    (assets / "fast/processor_config.json").write_text("{")
    with pytest.raises(
        ValueError, match="its assets/tokenizer/fast/processor_config.json is missing or damaged"
    ):
        Pi0Fast.from_preset(directory)


# === The CLI ===


def test_convert_writes_a_preset_for_a_path_without_keras_suffix(tmp_path, openpi_fixture, capsys):
    fixture = openpi_fixture("pi0")
    output = tmp_path / "pi0_base"

    def convert(*flags):
        return cli(
            ["convert", "openpi", str(fixture_path("pi0.npz")), "--model", "pi0",
             "--action-horizon", "10", "--max-token-len", "16", "--output", *flags]
        )  # fmt: skip

    assert convert(str(output)) == 0
    assert f"wrote {output} (keras-hub preset, " in capsys.readouterr().out
    assert listing(output) == ["config.json", "metadata.json", "model.weights.h5"]
    model = Pi0.from_preset(output)
    np.testing.assert_allclose(
        np.asarray(
            model.sample_actions(fixture.observation(model.image_keys), noise=fixture["input/noise"])
        ),
        fixture["output/sampled"],
        atol=1e-4,
        rtol=0,
    )
    assert convert(str(output)) == 2
    assert f"--output {output} is a directory that is not empty; pass --overwrite" in (
        capsys.readouterr().err
    )
    assert convert(str(output), "--overwrite") == 0
    assert sorted(os.listdir(tmp_path)) == ["pi0_base"]
    (output / "notes.txt").write_text("mine")
    assert convert(str(output), "--overwrite") == 2
    assert "holds files that are not a preset's (notes.txt)" in capsys.readouterr().err
    assert convert(str(tmp_path / "pi0.h5")) == 2
    assert "--output must be a .keras file or a preset directory, got" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["pi0_base"]
