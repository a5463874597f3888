"""convert and `.keras` loading refuse bad flags, damaged or wrong files; nothing half written."""

import os
import re
import shutil
import zipfile

import keras
import numpy as np
import pytest

from keras_openpi.cli import main as cli
from keras_openpi.convert import load_openpi_params
from keras_openpi.convert import pi0_from_openpi
from keras_openpi.convert.keras_file import load_keras_policy
from keras_openpi.convert.keras_file import load_keras_weights
from keras_openpi.convert.keras_file import read_keras_spec

from conftest import fixture_path

Q_EINSUM_1 = "PaliGemma/llm/layers/attn/q_einsum_1/w"


def _convert(source, output, *flags):
    return cli(
        ["convert", "openpi", str(source), "--model", "pi0", "--action-horizon", "4",
         "--output", str(output), *flags]
    )


def _one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("keras-openpi convert: error: ")
    return err


@pytest.fixture(scope="module")
def pi0_params(openpi_fixture):
    return load_openpi_params(openpi_fixture("pi0").path)


@pytest.fixture(scope="module")
def pi0_keras(tmp_path_factory, pi0_params):
    """A small converted π0 `.keras` file (read-only use; copy before damaging)."""
    path = tmp_path_factory.mktemp("keras") / "pi0.keras"
    assert _convert(fixture_path("pi0.npz"), path, "--max-token-len", "16") == 0
    return path


def _writable_checkpoint_copy(tmp_path):
    """A writable copy of the openpi orbax fixture (the fixture itself is read-only)."""
    copy = tmp_path / "pi0_checkpoint"
    shutil.copytree(fixture_path("pi0_checkpoint"), copy)
    for root, dirs, files in os.walk(copy):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return copy / "params"


def _largest_data_file(params_dir):
    files = [p for p in params_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


# === Weights ===


def test_nan_weight_in_an_npz_names_its_path(tmp_path, pi0_params, capsys):
    params = dict(pi0_params)
    params[Q_EINSUM_1] = params[Q_EINSUM_1].copy()
    params[Q_EINSUM_1][1, 2, 3, 4] = np.nan
    np.savez(tmp_path / "nan.npz", **params)
    output = tmp_path / "out.keras"
    err = _one_line_error(capsys, _convert(tmp_path / "nan.npz", output))
    assert f"weight '{Q_EINSUM_1}' holds nan at index (1, 2, 3, 4)" in err
    assert "1 non-finite values" in err and str(tmp_path / "nan.npz") in err
    assert sorted(os.listdir(tmp_path)) == ["nan.npz"]


def test_infinite_and_impossible_weights_are_refused(tmp_path, pi0_params):
    for value, expected in ((np.inf, "holds inf"), (3e9, "holds 3e+09 at index (0,)")):
        params = dict(pi0_params)
        params["state_proj/bias"] = params["state_proj/bias"].copy()
        params["state_proj/bias"][0] = value
        np.savez(tmp_path / "bad.npz", **params)
        with pytest.raises(ValueError, match=re.escape(f"weight 'state_proj/bias' {expected}")):
            load_openpi_params(tmp_path / "bad.npz")


def test_bfloat16_weights_are_checked_as_stored():
    """Released trees are bf16 and kept so; bf16 is not `np.floating`, yet it is checked."""
    import ml_dtypes

    from keras_openpi.convert.openpi_params import check_weight

    for value, expected in ((np.nan, "holds nan at index (1, 2)"), (3e9, "holds 3.003e+09")):  # 3e9 in bf16
        array = np.zeros((2, 3), ml_dtypes.bfloat16)
        array[1, 2] = value
        with pytest.raises(ValueError, match=re.escape(f"weight 'w' {expected}")):
            check_weight("w", array, "ckpt")
    check_weight("w", np.full((2, 3), 1e5, ml_dtypes.bfloat16), "ckpt")


def test_random_bytes_in_an_orbax_data_file_are_refused(tmp_path, capsys):
    """Random floats written over raw (incompressible) data: no decoder notices, the check does."""
    params_dir = _writable_checkpoint_copy(tmp_path)
    data = _largest_data_file(params_dir)
    blob = bytearray(data.read_bytes())
    middle = len(blob) // 2
    blob[middle : middle + 4096] = np.random.default_rng(0).bytes(4096)
    data.write_bytes(bytes(blob))
    output = tmp_path / "out" / "pi0.keras"
    err = _one_line_error(capsys, _convert(params_dir, output))
    assert f"{params_dir}: weight 'PaliGemma/llm/layers/attn/q_einsum_1/w' holds nan" in err
    assert "non-finite values of 32768" in err
    assert not (tmp_path / "out").exists()


def test_truncated_orbax_data_file_names_the_weight(tmp_path, capsys):
    params_dir = _writable_checkpoint_copy(tmp_path)
    data = _largest_data_file(params_dir)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    err = _one_line_error(capsys, _convert(params_dir, tmp_path / "out.keras"))
    assert f"openpi checkpoint {params_dir} is damaged or incomplete: cannot read weight '" in err
    assert "tensorstore_spec" not in err and "Traceback" not in err
    assert not (tmp_path / "out.keras").exists()


def test_damaged_orbax_metadata_is_named(tmp_path, capsys):
    params_dir = _writable_checkpoint_copy(tmp_path)
    metadata = params_dir / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:500])
    err = _one_line_error(capsys, _convert(params_dir, tmp_path / "out.keras"))
    assert "is damaged or incomplete: its metadata (_METADATA) is not valid JSON" in err
    (params_dir / "_METADATA").unlink()
    err = _one_line_error(capsys, _convert(params_dir, tmp_path / "out.keras"))
    assert "is not an openpi orbax checkpoint: it has no _METADATA" in err


@pytest.mark.parametrize("damage", ["truncate", "flip", "random", "empty"])
def test_damaged_npz_is_named_in_one_line(tmp_path, pi0_params, damage, capsys):
    path = tmp_path / "params.npz"
    np.savez(path, **pi0_params)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":  # inside an array: the zip's CRC-32 catches it
        blob[len(blob) // 2 : len(blob) // 2 + 64] = b"\xff" * 64
    elif damage == "random":
        blob = bytearray(np.random.default_rng(1).bytes(len(blob)))
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    err = _one_line_error(capsys, _convert(path, tmp_path / "out.keras"))
    assert str(path) in err
    if damage == "flip":
        assert "is damaged (entry '" in err and "Bad CRC-32" in err
    else:
        assert "is not an .npz file" in err
    assert sorted(os.listdir(tmp_path)) == ["params.npz"]


def test_unknown_extra_weights_are_refused(tmp_path, pi0_params, capsys):
    params = dict(pi0_params, **{"extra_head/kernel": np.zeros((4, 4), np.float32)})
    np.savez(tmp_path / "extra.npz", **params)
    err = _one_line_error(capsys, _convert(tmp_path / "extra.npz", tmp_path / "out.keras"))
    assert "has 1 weights that a Pi0 of this architecture does not use: 'extra_head/kernel'" in err
    assert "most likely another model's checkpoint" in err
    assert not (tmp_path / "out.keras").exists()


# === Flags and output ===


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-scale", "nan"], "--lora-scale must be a finite number > 0"),
        (["--lora-scale", "inf"], "--lora-scale must be a finite number > 0"),
        (["--lora-scale", "0"], "--lora-scale must be a finite number > 0"),
        (["--lora-scale", "-1"], "--lora-scale must be a finite number > 0"),
        (["--action-horizon", "0"], "--action-horizon must be an integer >= 1, got 0."),
        (["--max-token-len", "0"], "--max-token-len must be an integer >= 1, got 0."),
        (["--max-token-len", "-5"], "--max-token-len must be an integer >= 1, got -5."),
    ],
)
def test_bad_flags_fail_before_reading(tmp_path, flags, message, capsys):
    source = tmp_path / "never_read.npz"  # no such file: the flag check comes first
    err = _one_line_error(capsys, _convert(source, tmp_path / "out.keras", *flags))
    assert message in err
    assert os.listdir(tmp_path) == []


def test_pi0_fast_action_dim_must_be_positive(tmp_path, capsys):
    code = cli(["convert", "openpi", str(tmp_path / "x.npz"), "--model", "pi0_fast",
                "--action-horizon", "4", "--action-dim", "0", "--output", str(tmp_path / "o.keras")])
    assert "--action-dim must be an integer >= 1, got 0." in _one_line_error(capsys, code)
    assert os.listdir(tmp_path) == []


def test_api_checks_the_same_settings(openpi_fixture):
    path = openpi_fixture("pi0").path
    with pytest.raises(ValueError, match=r"lora_scale must be a finite number > 0 .*, got nan\."):
        pi0_from_openpi(path, action_horizon=4, lora_scale=float("nan"))
    with pytest.raises(ValueError, match="max_token_len must be an integer >= 1, got 0"):
        pi0_from_openpi(path, action_horizon=4, max_token_len=0)
    with pytest.raises(ValueError, match="action_horizon must be an integer >= 1, got 2.5"):
        pi0_from_openpi(path, action_horizon=2.5)


def test_lora_scale_that_overflows_the_merge_is_refused(openpi_fixture):
    with pytest.raises(ValueError, match=r"the LoRA merge \(lora_scale=1e\+30\): weight '"):
        pi0_from_openpi(openpi_fixture("pi0_lora").path, action_horizon=4, lora_scale=1e30)


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    output = tmp_path / "pi0.keras"
    output.write_bytes(b"the user's file")
    err = _one_line_error(capsys, _convert(fixture_path("pi0.npz"), output))
    assert f"--output {output} exists already; pass --overwrite" in err
    assert output.read_bytes() == b"the user's file"
    code = _convert(fixture_path("pi0.npz"), output, "--overwrite")
    assert code == 0 and read_keras_spec(output)["class_name"] == "Pi0"
    assert sorted(os.listdir(tmp_path)) == ["pi0.keras"]


def test_unwritable_output_fails_before_converting(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _one_line_error(capsys, _convert(tmp_path / "missing.npz", blocker / "sub" / "p.keras"))
    assert f"{blocker} is a file, not a folder" in err  # before the missing source is noticed
    # /proc takes no new files, even for root (permission bits would not stop root).
    err = _one_line_error(capsys, _convert(tmp_path / "missing.npz", "/proc/keras_openpi.keras"))
    assert "cannot write --output /proc/keras_openpi.keras: /proc does not take new files" in err
    (tmp_path / "folder.keras").mkdir()
    err = _one_line_error(capsys, _convert(tmp_path / "missing.npz", tmp_path / "folder.keras"))
    assert "is a directory" in err


def test_missing_output_folders_are_created(tmp_path):
    output = tmp_path / "models" / "pi0" / "pi0.keras"
    assert _convert(fixture_path("pi0.npz"), output) == 0
    assert sorted(os.listdir(output.parent)) == ["pi0.keras"]


# === .keras files ===


def test_keras_policy_loads_and_matches_the_converted_model(pi0_keras):
    model = load_keras_policy(pi0_keras)
    assert type(model).__name__ == "Pi0" and model.max_token_len == 16
    spec = read_keras_spec(pi0_keras)
    assert spec["registered_name"] == "keras_openpi>Pi0"
    assert spec["config"]["action_horizon"] == 4


def test_keras_of_another_class_is_refused(tmp_path):
    path = tmp_path / "sequential.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    with pytest.raises(ValueError, match=r"holds a keras\.Sequential, not a keras_openpi policy; "
                       r"expected keras_openpi>Pi0 or keras_openpi>Pi0Fast"):
        load_keras_policy(path)
    with pytest.raises(ValueError, match=r"expected keras_openpi>Pi0\.$"):
        read_keras_spec(path, expected_classes=("Pi0",))


def test_truncated_and_non_keras_files_are_named(tmp_path, pi0_keras):
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(pi0_keras.read_bytes()[: pi0_keras.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{truncated} is not a .keras file: it is not a zip"):
        load_keras_policy(truncated)
    with pytest.raises(FileNotFoundError, match="no .keras file at"):
        load_keras_policy(tmp_path / "nowhere.keras")
    no_config = tmp_path / "no_config.keras"
    with zipfile.ZipFile(no_config, "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(ValueError, match="the archive has no config.json"):
        read_keras_spec(no_config)


def _damage_weights_member(source, target):
    """Copies `source` with 64 bytes in the middle of model.weights.h5 overwritten."""
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo("model.weights.h5")
        assert info.compress_type == zipfile.ZIP_STORED
        header = info.header_offset + 30 + len(info.filename) + len(info.extra)
    blob = bytearray(source.read_bytes())
    middle = header + info.file_size // 2
    blob[middle : middle + 64] = np.full(16, np.nan, np.float32).tobytes()
    target.write_bytes(bytes(blob))


def test_damaged_keras_weights_fail_their_checksum(tmp_path, pi0_keras):
    damaged = tmp_path / "damaged.keras"
    _damage_weights_member(pi0_keras, damaged)
    with pytest.raises(ValueError, match=r"damaged.keras is damaged \(model.weights.h5\): "
                       "Bad CRC-32"):
        load_keras_policy(damaged)
    model = load_keras_policy(pi0_keras)
    before = [w.numpy().copy() for w in model.weights[:3]]
    with pytest.raises(ValueError, match="Bad CRC-32"):
        load_keras_weights(model, damaged)
    for old, new in zip(before, model.weights[:3]):  # refused before anything was read
        np.testing.assert_array_equal(old, new.numpy())


def test_non_finite_weights_in_a_keras_file_are_named(tmp_path, pi0_keras):
    model = load_keras_policy(pi0_keras)
    kernel = model.get_layer("action_out_proj").kernel
    kernel.assign(keras.ops.full(kernel.shape, np.nan))
    path = tmp_path / "nan.keras"
    model.save(path)
    with pytest.raises(ValueError, match=f"{path}: weight '{kernel.path}' holds nan at index"):
        load_keras_policy(path)


# === The loaders' users: training and serving ===


def test_train_and_serve_refuse_a_keras_file_of_another_class(tmp_path, capsys):
    from keras_openpi.serving import Policy

    from training_support import TINY_SETS

    path = tmp_path / "sequential.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(path)
    sets = [arg for item in [*TINY_SETS, f"weights={path}"] for arg in ("--set", item)]
    code = cli(["train", "--config", "demo", "--checkpoint-dir", str(tmp_path / "run"), *sets])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        f"keras-openpi train: error: {path} holds a keras.Sequential, not a keras_openpi policy; "
        "expected keras_openpi>Pi0 or keras_openpi>Pi0Fast."
    )
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="holds a keras.Sequential"):
        Policy.from_checkpoint(path, robot="raw")


def test_serving_refuses_a_damaged_keras_file(tmp_path, pi0_keras):
    from keras_openpi.serving import Policy

    damaged = tmp_path / "damaged.keras"
    _damage_weights_member(pi0_keras, damaged)
    with pytest.raises(ValueError, match="Bad CRC-32"):
        Policy.from_checkpoint(damaged, robot="raw")
