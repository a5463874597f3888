"""openpi export: openpi's parameter tree (every path, shape, dtype) and exact round trips."""

import os

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_openpi.cli import main as cli
from keras_openpi.convert import export_openpi
from keras_openpi.convert import to_openpi_params
from keras_openpi.convert import pi0_fast_from_openpi
from keras_openpi.convert import pi0_from_openpi
from keras_openpi.convert.openpi_params import _read_orbax
from keras_openpi.data.transforms import flatten_dict

from conftest import fixture_path


def _import(fixture, name, source=None):
    meta = fixture.meta
    source = source or fixture.path
    if name == "pi0_fast":
        return pi0_fast_from_openpi(
            source, action_dim=meta["action_dim"], action_horizon=meta["action_horizon"],
            max_token_len=meta["max_token_len"],
        )
    return pi0_from_openpi(
        source, action_horizon=meta["action_horizon"], max_token_len=meta["max_token_len"],
        model="pi05" if name == "pi05" else "pi0",
    )


def _stored(directory):
    """The exported orbax tree as stored: `{openpi path: array}` with its dtypes (nothing cast)."""
    tree = flatten_dict(_read_orbax(os.fspath(directory / "params")))
    return {k[len("params/") :]: np.asarray(v) for k, v in tree.items()}


def _assert_same_weights(a, b):
    assert [w.path for w in a.weights] == [w.path for w in b.weights]
    for x, y in zip(a.weights, b.weights):
        assert x.dtype == y.dtype, x.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y), err_msg=x.path)


@pytest.mark.parametrize("name", ["pi0", "pi05", "pi0_fast"])
def test_tree_is_openpis_and_round_trip_is_exact(name, tmp_path, openpi_fixture):
    fixture = openpi_fixture(name)
    model = _import(fixture, name)
    export_openpi(model, tmp_path / "out")
    stored = _stored(tmp_path / "out")
    expected = {k[len("params/") :]: fixture[k] for k in fixture.data if k.startswith("params/")}
    assert sorted(stored) == sorted(expected)
    for path, array in expected.items():
        assert stored[path].shape == array.shape and stored[path].dtype == array.dtype, path
        np.testing.assert_array_equal(stored[path], array, err_msg=path)
    _assert_same_weights(_import(fixture, name, source=tmp_path / "out"), model)


def test_tree_matches_the_released_orbax_layout(tmp_path, openpi_fixture):
    """Against the orbax fixture (openpi's on-disk `params/` format): same paths, shapes and dtypes."""
    model = _import(openpi_fixture("pi0"), "pi0")
    export_openpi(model, tmp_path / "out")
    reference = flatten_dict(_read_orbax(os.fspath(fixture_path("pi0_checkpoint") / "params")))
    exported = flatten_dict(_read_orbax(os.fspath(tmp_path / "out" / "params")))
    assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in exported.items()} == {
        k: (np.shape(v), np.asarray(v).dtype) for k, v in reference.items()
    }


def test_lora_is_merged(tmp_path, openpi_fixture):
    fixture = openpi_fixture("pi0")
    model = _import(fixture, "pi0")
    model.enable_lora(rank=2, alpha=4.0)
    rng = np.random.default_rng(0)
    for layer in model._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            for weight in (layer.lora_kernel_a, layer.lora_kernel_b):
                weight.assign(rng.normal(0, 0.05, weight.shape).astype("float32"))
    export_openpi(model, tmp_path / "out")
    assert not [k for k in _stored(tmp_path / "out") if "lora" in k]
    model.merge_lora()
    _assert_same_weights(_import(fixture, "pi0", source=tmp_path / "out"), model)


def test_openpi_lora_checkpoint_exports_merged(openpi_fixture):
    fixture = openpi_fixture("pi0_lora")
    model = pi0_from_openpi(
        fixture.path, action_horizon=10, max_token_len=16,
        lora_scale=fixture.meta["lora_alpha"] / fixture.meta["lora_rank"],
    )
    params = to_openpi_params(model)
    assert sorted(params) == sorted(
        k[len("params/") :] for k in fixture.data if k.startswith("params/") and "lora" not in k
    )


def test_bfloat16(tmp_path, openpi_fixture):
    fixture = openpi_fixture("pi0")
    export_openpi(_import(fixture, "pi0"), tmp_path / "out", dtype="bfloat16")
    stored = _stored(tmp_path / "out")
    assert {a.dtype for a in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
    q = "PaliGemma/llm/layers/attn/q_einsum/w"
    np.testing.assert_array_equal(stored[q], fixture[f"params/{q}"].astype(ml_dtypes.bfloat16))


def test_cli_export_openpi(tmp_path, openpi_fixture):
    fixture = openpi_fixture("pi05")
    model = _import(fixture, "pi05")
    model.save(tmp_path / "m.keras")
    assert cli(["export", "openpi", str(tmp_path / "m.keras"), "--output", str(tmp_path / "out")]) == 0
    _assert_same_weights(_import(fixture, "pi05", source=tmp_path / "out"), model)
    # An output that exists is refused and left alone.
    marker = tmp_path / "out" / "params" / "_METADATA"
    before = marker.read_bytes()
    assert cli(["export", "openpi", str(tmp_path / "m.keras"), "--output", str(tmp_path / "out")]) == 2
    assert marker.read_bytes() == before
    assert cli(["export", "openpi", str(tmp_path / "none.keras"), "--output", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_quantized_model_is_refused_and_nothing_is_written(tmp_path, openpi_fixture):
    model = _import(openpi_fixture("pi0"), "pi0")
    model.quantize("int8")
    with pytest.raises(ValueError, match="is quantized"):
        export_openpi(model, tmp_path / "out")
    assert not list(tmp_path.iterdir())
