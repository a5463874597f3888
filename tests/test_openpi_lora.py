"""openpi's LoRA form: openpi LoRA checkpoints imported unmerged, trained on, saved, and exported back."""

import os
import re

import keras
import numpy as np
import pytest
from finetuning_helpers import fixed_velocity
from finetuning_helpers import snapshot
from finetuning_helpers import tiny_policy
from finetuning_helpers import training_batch

from keras_openpi.cli import main as cli
from keras_openpi.convert import export_openpi
from keras_openpi.convert import pi0_fast_from_openpi
from keras_openpi.convert import pi0_from_openpi
from keras_openpi.convert import to_openpi_params
from keras_openpi.convert.openpi_params import _read_orbax
from keras_openpi.data.transforms import flatten_dict
from keras_openpi.finetuning import apply_strategy
from keras_openpi.training import CheckpointManager
from keras_openpi.training import load_checkpoint_model

ATOL = 1e-4
LLM = "PaliGemma/llm/layers"
# openpi's adapted base weights (gemma.py, lora.py) and their LoRA arrays.
ADAPTED = re.compile(rf"{LLM}/(attn/(q|kv|attn_vec)_einsum(_1)?/w|mlp(_1)?/(gating_einsum|linear))")
GEMMA = re.compile(r"gemma/.*")


def lora_pair(base):
    stem = base[: -len("w")] if base.endswith("/w") else base + "_"
    return stem + "lora_a", stem + "lora_b"


def checkpoint_params(fixture):
    return {k[len("params/") :]: v for k, v in fixture.data.items() if k.startswith("params/")}


def import_fixture(fixture, **options):
    return pi0_from_openpi(fixture.path, action_horizon=10, max_token_len=16, **options)


@pytest.fixture(scope="module")
def kept(openpi_fixture):
    return import_fixture(openpi_fixture("pi0_lora"), keep_lora=True)


@pytest.fixture(scope="module")
def merged(openpi_fixture):
    return import_fixture(openpi_fixture("pi0_lora"))


def adapter_values(model, kind):
    return [np.asarray(v.numpy()) for v in model.weights if v.name == f"lora_kernel_{kind}"]


def test_trainable_adapters_are_the_checkpoints_lora_arrays(kept, openpi_fixture):
    params = checkpoint_params(openpi_fixture("pi0_lora"))
    lora = {k: v for k, v in params.items() if "lora" in k}
    adapters = [v for v in kept.weights if v.name.startswith("lora_kernel")]
    assert sum(a.size for a in lora.values()) == sum(int(np.prod(v.shape)) for v in adapters) == 64_512
    # Every adapter is its slice of the checkpoint's arrays, value for value.
    slices = {
        "attention/query": ("attn/q_einsum{}/", lambda a, i: a[i]),
        "attention/key": ("attn/kv_einsum{}/", lambda a, i: a[i, 0]),
        "attention/value": ("attn/kv_einsum{}/", lambda a, i: a[i, 1]),
        "attention/output": ("attn/attn_vec_einsum{}/", lambda a, i: a[i]),
        "feed_forward/gate": ("mlp{}/gating_einsum_", lambda a, i: a[i, 0]),
        "feed_forward/up": ("mlp{}/gating_einsum_", lambda a, i: a[i, 1]),
        "feed_forward/down": ("mlp{}/linear_", lambda a, i: a[i]),
    }
    weights = {v.path.removeprefix("pi0/"): v for v in kept.weights}
    checked = 0
    for i in range(4):
        for suffix, expert in (("", "vlm"), ("_1", "action_expert")):
            for layer, (openpi, select) in slices.items():
                for kind in ("a", "b"):
                    expected = select(lora[f"{LLM}/{openpi.format(suffix)}lora_{kind}"], i)
                    value = weights[f"gemma/decoder_block_{i}/{expert}/{layer}/lora_kernel_{kind}"]
                    np.testing.assert_array_equal(value.numpy(), expected)
                    checked += 1
    assert checked == len(adapters) == 4 * 2 * 7 * 2
    # Frozen as openpi's pi0 LoRA config (freeze filter: .*llm.* but not .*lora.*).
    trainable = {v.path.removeprefix("pi0/") for v in kept.trainable_weights}
    gemma = {p for p in weights if GEMMA.fullmatch(p)}
    assert trainable & gemma == {p for p in gemma if "lora_kernel" in p}
    assert trainable - gemma == {p for p in weights if not GEMMA.fullmatch(p) and "seed_generator" not in p}
    assert kept.finetuning_state.lora == {
        "vlm": {"rank": 4, "alpha": 4.0, "form": "openpi"},
        "action_expert": {"rank": 4, "alpha": 4.0, "form": "openpi"},
    }


def test_outputs_equal_the_merged_import_and_openpis(kept, merged, openpi_fixture):
    fixture = openpi_fixture("pi0_lora")
    observation = fixture.observation(kept.image_keys)
    for name, run in (
        ("output/loss", lambda m: m.flow_matching_loss(
            observation, fixture["input/actions"], noise=fixture["input/noise"], time=fixture["input/time"])),
        ("output/sampled", lambda m: m.sample_actions(observation, noise=fixture["input/noise"], num_steps=10)),
    ):
        ours, theirs = (keras.ops.convert_to_numpy(run(m)) for m in (kept, merged))
        np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0, err_msg=name)
        np.testing.assert_allclose(ours, fixture[name], atol=ATOL, rtol=0, err_msg=name)


def test_export_keep_lora_is_openpis_tree_and_round_trips_exactly(kept, merged, openpi_fixture, tmp_path):
    fixture = openpi_fixture("pi0_lora")
    export_openpi(kept, tmp_path / "out", keep_lora=True)
    stored = {
        k[len("params/") :]: np.asarray(v)
        for k, v in flatten_dict(_read_orbax(os.fspath(tmp_path / "out" / "params"))).items()
    }
    expected = checkpoint_params(fixture)
    assert sorted(stored) == sorted(expected)
    for path, array in expected.items():
        assert (stored[path].shape, stored[path].dtype) == (array.shape, array.dtype), path
        np.testing.assert_array_equal(stored[path], array, err_msg=path)
    again = pi0_from_openpi(tmp_path / "out", action_horizon=10, max_token_len=16, keep_lora=True)
    assert [w.path for w in again.weights] == [w.path for w in kept.weights]
    for a, b in zip(again.weights, kept.weights):
        assert a.dtype == b.dtype and a.trainable == b.trainable, a.path
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert again.finetuning_state == kept.finetuning_state
    # Without the flag the adapters are merged: the merged import's weights, to float32 rounding.
    merged_params = to_openpi_params(kept)
    assert not [k for k in merged_params if "lora" in k]
    for path, array in to_openpi_params(merged).items():
        np.testing.assert_allclose(merged_params[path], array, atol=1e-6, rtol=0, err_msg=path)


def test_keras_file_round_trip_is_exact(kept, tmp_path):
    kept.save(tmp_path / "kept.keras")
    reloaded = keras.saving.load_model(tmp_path / "kept.keras")
    before, after = snapshot(kept), snapshot(reloaded)
    assert sorted(before) == sorted(after)
    for name, (value, trainable) in before.items():
        np.testing.assert_array_equal(after[name][0], value, err_msg=name)
        assert after[name][1] == trainable, name
    assert reloaded.finetuning_state == kept.finetuning_state
    query = reloaded.gemma.decoder_blocks[0].experts[0].attention.query
    assert (query.lora_form, tuple(query.lora_kernel_b.shape)) == ("openpi", (8, 4, 16))


def test_cli_convert_and_export_keep_lora(openpi_fixture, tmp_path, capsys):
    fixture = openpi_fixture("pi0_lora")
    common = ["--model", "pi0", "--action-horizon", "10", "--max-token-len", "16"]
    out = str(tmp_path / "kept.keras")
    assert cli(["convert", "openpi", str(fixture.path), *common, "--keep-lora", "--output", out]) == 0
    model = keras.saving.load_model(out)
    assert len(model.finetuning_state.lora) == 2
    assert cli(["export", "openpi", out, "--keep-lora", "--output", str(tmp_path / "back")]) == 0
    assert "openpi restores it with vlm LoRAConfig(rank=4, alpha=4)" in capsys.readouterr().out
    tree = flatten_dict(_read_orbax(os.fspath(tmp_path / "back" / "params")))
    for path, array in checkpoint_params(fixture).items():
        np.testing.assert_array_equal(np.asarray(tree[f"params/{path}"]), array, err_msg=path)
    # The flag is for openpi checkpoints only; bad uses fail and write nothing.
    assert cli(["export", "lerobot", out, "--keep-lora", "--output", str(tmp_path / "lr")]) == 2
    assert "--keep-lora is for openpi exports" in capsys.readouterr().err
    lerobot = str(tmp_path / "x.keras")
    assert cli(["convert", "lerobot", str(tmp_path), "--keep-lora", "--output", lerobot]) == 2
    assert "--keep-lora is for openpi checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "lr").exists() and not os.path.exists(lerobot)


def test_keep_lora_errors(openpi_fixture, tmp_path):
    with pytest.raises(ValueError, match="has no LoRA weights \\(no lora_a / lora_b arrays\\)"):
        import_fixture(openpi_fixture("pi0"), keep_lora=True)
    params = checkpoint_params(openpi_fixture("pi0_lora"))
    del params[f"{LLM}/mlp_1/linear_lora_b"]
    np.savez(tmp_path / "partial.npz", **params)
    with pytest.raises(ValueError, match="adapts only part of the action_expert .* not 'PaliGemma/llm/layers/mlp_1/linear_lora_b'"):
        pi0_from_openpi(tmp_path / "partial.npz", action_horizon=10, max_token_len=16, keep_lora=True)
    params[f"{LLM}/mlp_1/linear_lora_b"] = np.zeros((4, 2, 64), "float32")
    np.savez(tmp_path / "ranks.npz", **params)
    with pytest.raises(ValueError, match="action_expert adapters have several ranks .*linear_lora_b: 2"):
        pi0_from_openpi(tmp_path / "ranks.npz", action_horizon=10, max_token_len=16, keep_lora=True)
    plain = import_fixture(openpi_fixture("pi0"))
    with pytest.raises(ValueError, match="has no LoRA adapters to write"):
        export_openpi(plain, tmp_path / "a", keep_lora=True)
    plain.enable_lora(rank=2)
    with pytest.raises(ValueError, match="'pi0/gemma/decoder_block_\\d/.*' has Keras-form adapters"):
        export_openpi(plain, tmp_path / "b", keep_lora=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# === Tiny models: training continues; π0.5 and π0-FAST checkpoints ===


def openpi_lora_checkpoint(model_type, path, rank=2, seed=0):
    """A tiny model's openpi params with openpi LoRA arrays (lora.py's shapes) on every adapted weight."""
    base = tiny_policy(model_type)
    params = to_openpi_params(base)
    rng = np.random.default_rng(seed)
    for key in [k for k in params if ADAPTED.fullmatch(k)]:
        shape = params[key].shape  # (depth, ..., in, out): lora_a (..., in, r), lora_b (..., r, out)
        a_path, b_path = lora_pair(key)
        params[a_path] = rng.normal(0, 0.2, shape[:-1] + (rank,)).astype("float32")
        params[b_path] = rng.normal(0, 0.2, shape[:-2] + (rank, shape[-1])).astype("float32")
    np.savez(path, **params)
    return base


def import_tiny(model_type, path, **options):
    base = tiny_policy(model_type)
    settings = {
        "action_horizon": base.action_horizon,
        "max_token_len": base.max_token_len,
        "image_keys": base.image_keys,
    }
    if model_type == "pi0_fast":
        return pi0_fast_from_openpi(path, action_dim=base.action_dim, **settings, **options)
    return pi0_from_openpi(path, model=model_type, **settings, **options)


@pytest.mark.parametrize("model_type", ["pi05", "pi0_fast"])
def test_other_models_keep_lora(model_type, tmp_path):
    openpi_lora_checkpoint(model_type, tmp_path / "lora.npz")
    kept = import_tiny(model_type, tmp_path / "lora.npz", keep_lora=True)
    merged = import_tiny(model_type, tmp_path / "lora.npz")
    if model_type == "pi0_fast":
        observation, _ = training_batch(kept, size=2)
        ours, theirs = (keras.ops.convert_to_numpy(m.token_loss(observation)) for m in (kept, merged))
    else:
        ours, theirs = fixed_velocity(kept), fixed_velocity(merged)
    assert np.abs(ours - theirs).max() < ATOL
    export_openpi(kept, tmp_path / "out", keep_lora=True)
    again = import_tiny(model_type, tmp_path / "out", keep_lora=True)
    for a, b in zip(again.weights, kept.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_training_continues_from_the_imported_adapters(tmp_path):
    """A fit step moves the adapters and nothing else of the Gemma; checkpoints resume exactly."""
    openpi_lora_checkpoint("pi0", tmp_path / "lora.npz")
    model = import_tiny("pi0", tmp_path / "lora.npz", keep_lora=True)
    model.save(tmp_path / "kept.keras")
    # What `keras-openpi train` does with weights=kept.keras: the strategy keeps matching adapters.
    model = keras.saving.load_model(tmp_path / "kept.keras")
    imported = snapshot(model)
    apply_strategy(model, {"name": "lora", "rank": 2, "form": "openpi"})
    assert snapshot(model).keys() == imported.keys()
    for name, (value, trainable) in snapshot(model).items():
        np.testing.assert_array_equal(value, imported[name][0], err_msg=name)
        assert trainable == imported[name][1], name
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    observation, actions = training_batch(model, size=2)
    model.fit(observation, actions, batch_size=2, epochs=1, shuffle=False, verbose=0)
    after = snapshot(model)
    changed = {n for n, (v, _) in imported.items() if not np.array_equal(v, after[n][0])}
    gemma = {n for n in imported if GEMMA.fullmatch(n)}
    # π0 never reads the VLM's last-block output: those adapters get no gradient.
    last = re.compile(r"gemma/decoder_block_1/vlm/(attention/(query|output)|feed_forward/\w+)/lora_kernel_.")
    assert changed & gemma == {n for n in gemma if "lora_kernel" in n and not last.fullmatch(n)}
    assert {n for n in changed - gemma} == {
        n for n, (_, trainable) in imported.items() if trainable and not GEMMA.fullmatch(n)
    }
    # A training checkpoint (weights, optimizer) restores exactly, adapters unmerged.
    manager = CheckpointManager(tmp_path / "run")
    manager.save(1, model)
    served = load_checkpoint_model(tmp_path / "run")
    for name, (value, trainable) in snapshot(served).items():
        np.testing.assert_array_equal(value, after[name][0], err_msg=name)
        assert trainable == after[name][1], name
    assert served.finetuning_state.lora == model.finetuning_state.lora
    with pytest.raises(ValueError, match="already has LoRA adapters .*\"rank\": 2.* asks for .*\"rank\": 16"):
        apply_strategy(served, "lora", rank="openpi", form="openpi")
    with pytest.raises(ValueError, match="already has LoRA adapters .*\"form\": \"openpi\".* asks for"):
        apply_strategy(served, "lora", rank=2)


@pytest.mark.parametrize("model_type", ["pi0", "pi05", "pi0_fast"])
def test_openpis_lora_configuration(model_type):
    """`rank="openpi", form="openpi"`: gemma_2b_lora (+ gemma_300m_lora), frozen by openpi's filter."""
    model = tiny_policy(model_type)
    apply_strategy(model, "lora", rank="openpi", form="openpi")
    expected = {"vlm": {"rank": 16, "alpha": 16.0, "form": "openpi"}}
    if model_type != "pi0_fast":
        expected["action_expert"] = {"rank": 32, "alpha": 32.0, "form": "openpi"}
    assert model.finetuning_state.lora == expected
    query = model.gemma.decoder_blocks[0].experts[0].attention.query
    assert tuple(query.lora_kernel_b.shape) == (2, 16, 8)  # (N, r, H): a B per head
    # openpi's get_freeze_filter: All(.*llm.*, Not(.*lora.*)); vision and projections train.
    for variable in model.weights:
        path = variable.path.removeprefix(f"{model.name}/")
        if "seed_generator" in path:
            continue
        frozen = bool(GEMMA.fullmatch(path)) and "lora_kernel" not in path
        assert variable.trainable != frozen, path
    assert "openpi form" in model.trainable_summary().title


def test_form_errors():
    model = tiny_policy("pi0")
    with pytest.raises(ValueError, match="LoRA form must be one of \\('keras', 'openpi'\\), got 'peft'"):
        apply_strategy(model, "full", form="peft")
    with pytest.raises(ValueError, match="quantize='int8' with form='openpi': openpi's LoRA form adapts float"):
        apply_strategy(model, "lora", quantize="int8", form="openpi")
    assert model.trainable_summary()["total"]["frozen"] == 0  # nothing changed
    model.enable_lora(rank=2, form="openpi")
    with pytest.raises(ValueError, match="has openpi-form LoRA adapters .*merge_lora\\(\\) before quantizing"):
        model.quantize("int8")
    assert not [layer for layer in model._flatten_layers() if getattr(layer, "quantization_mode", None)]
