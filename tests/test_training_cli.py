"""`keras-openpi train`: the registry, `--set`, errors before any compilation, a demo run."""

import contextlib
import dataclasses
import io
import json
import zipfile

import h5py
import numpy as np
import pytest

from keras_openpi.cli import main
from keras_openpi.data.procedural_source import ProceduralDataset
from keras_openpi.serving import Policy
from keras_openpi.training import CONFIGS
from keras_openpi.training import apply_overrides
from keras_openpi.training import get_config
from keras_openpi.training import read_metrics
from keras_openpi.training.config import config_from_dict
from training_support import TINY_SETS


def run_cli(*args):
    """`keras-openpi train ARGS`: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *args])
    return code, out.getvalue(), err.getvalue()


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


def test_registry_mirrors_openpis_configs():
    assert list(CONFIGS) == [
        "pi0_aloha_sim",
        "pi0_aloha_sim_lora",
        "pi0_aloha_sim_small",
        "pi0_libero",
        "pi0_libero_lora",
        "pi05_libero",
        "pi0_droid",
        "pi05_droid",
        "pi0_fast_droid",
        "pi0_fast_libero",
        "pi0_fast_libero_low_mem_finetune",
        "demo",
        "pi05_demo",
        "pi0_fast_demo",
        "pi0_metaworld_small",
        "pi0_metaworld_small_finetune",
        "pi0_metaworld",
        "pi0_metaworld_lora",
    ]
    libero = get_config("pi0_libero")
    assert (libero.batch_size, libero.num_train_steps, libero.ema_decay, libero.seed) == (
        32,
        30_000,
        0.99,
        42,
    )
    assert (libero.save_interval, libero.keep_period, libero.fsdp_devices) == (1000, 5000, 1)
    assert dataclasses.astuple(libero.optimizer) == (
        1000,
        2.5e-5,
        30_000,
        2.5e-6,
        0.9,
        0.95,
        1e-8,
        1e-10,
        1.0,
    )
    assert (
        libero.data.robot == "libero" and libero.data.delta_actions and libero.data.prompt_from_task
    )
    assert libero.data.action_keys == ("actions",) and libero.model_type == "pi0" and libero.augment
    lora = get_config("pi0_libero_lora")
    assert lora.strategy["name"] == "lora" and lora.strategy["frozen_dtype"] == "bfloat16"
    assert lora.ema_decay is None
    pi05 = get_config("pi05_libero")
    assert pi05.model_type == "pi05" and pi05.model["action_horizon"] == 10
    assert pi05.discrete_state_input is False and not pi05.data.delta_actions
    assert (pi05.batch_size, pi05.ema_decay) == (256, 0.999)
    assert dataclasses.astuple(pi05.optimizer)[:4] == (10_000, 5e-5, 1_000_000, 5e-5)
    aloha = get_config("pi0_aloha_sim")
    assert aloha.data.robot == "aloha" and aloha.data.default_prompt == "Transfer cube"
    assert not aloha.data.delta_actions and aloha.num_train_steps == 20_000
    assert get_config("pi0_droid").model["action_horizon"] == 10
    # openpi's π0.5 and π0-FAST configs (Pi0Config(pi05=True), Pi0FASTConfig(...)).
    droid = get_config("pi05_droid")
    assert droid.model_type == "pi05" and droid.model["action_horizon"] == 15
    assert droid.data.robot == "droid" and droid.data.asset_id == "droid"
    fast_droid = get_config("pi0_fast_droid")
    assert fast_droid.model_type == "pi0_fast" and fast_droid.data == droid.data
    assert (fast_droid.model["action_dim"], fast_droid.model["action_horizon"]) == (8, 10)
    assert "max_token_len" not in fast_droid.model  # Pi0Fast's default: openpi's 250
    fast = get_config("pi0_fast_libero")
    assert fast.model_type == "pi0_fast" and fast.data == libero.data
    assert (fast.model["action_dim"], fast.model["action_horizon"]) == (7, 10)
    assert fast.model["max_token_len"] == 180 and fast.ema_decay == 0.99
    # LIBERO's cameras, fed as openpi feeds the robot's images to π0-FAST.
    assert fast.model["image_keys"] == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    fast_lora = get_config("pi0_fast_libero_low_mem_finetune")
    assert fast_lora.model == fast.model and fast_lora.strategy == lora.strategy
    assert fast_lora.ema_decay is None and fast_lora.num_train_steps == 30_000
    assert get_config("pi05_demo").model_type == "pi05"
    assert get_config("pi0_fast_demo").model["action_dim"] == 3  # the reach task's
    for config in CONFIGS.values():
        assert config_from_dict(config.to_dict()) == config
    # A run's train_config.json of an older version (no model_type) reads as before.
    old = {k: v for k, v in pi05.to_dict().items() if k != "model_type"}
    old["model"] = {**old["model"], "pi05": True}
    assert config_from_dict(old) == pi05


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.pi05=true"], "model.pi05=True contradicts model_type 'pi0': set model_type=pi05"),
        (["model_type=pi1"], r"model_type must be one of \['pi0', 'pi05', 'pi0_fast'\], got 'pi1'"),
        (["fast_tokenizer=/fast"], "fast_tokenizer is π0-FAST's action tokenizer; model_type is"),
        (
            ["model_type=pi0_fast", "discrete_state_input=true"],
            "discrete_state_input is a π0.5 option .*; model_type is 'pi0_fast'",
        ),
    ],
)
def test_model_type_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_config("pi0_libero"), overrides)


def test_overrides_reach_into_groups_and_check_types():
    config = apply_overrides(
        get_config("pi0_libero"),
        [
            "batch_size=8",
            "optimizer.peak_lr=1e-4",
            "data.path=/data/libero",
            "model.action_horizon=10",
            'strategy={"name": "lora", "rank": 8}',
            "ema_decay=null",
            'data.action_keys=["action"]',
        ],
    )
    assert (config.batch_size, config.optimizer.peak_lr, config.data.path) == (
        8,
        1e-4,
        "/data/libero",
    )
    assert config.model == {"dtype": "mixed_bfloat16", "action_horizon": 10}
    assert config.strategy == {"name": "lora", "rank": 8} and config.ema_decay is None
    assert config.data.action_keys == ("action",)
    with pytest.raises(
        ValueError,
        match=r"--set optimizer.peak: OptimizerConfig has no setting 'peak'; "
        r"did you mean 'optimizer.peak_lr'\?",
    ):
        apply_overrides(config, ["optimizer.peak=1"])
    with pytest.raises(ValueError, match="--set batch_size expects an integer, got 'eight'"):
        apply_overrides(config, ["batch_size=eight"])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        apply_overrides(config, ["batch_size=0"])
    with pytest.raises(ValueError, match="--set takes KEY=VALUE, got 'batch_size'"):
        apply_overrides(config, ["batch_size"])


def test_list_and_unknown_config_suggestion():
    code, out, _ = run_cli("--list")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == list(CONFIGS)
    code, _, err = run_cli("--config", "pi0_libro")
    assert code == 2
    assert err.strip() == (
        "keras-openpi train: error: unknown config 'pi0_libro'; did you mean 'pi0_libero'? "
        "(`keras-openpi train --list` lists them)"
    )


def test_data_weights_and_tokenizer_errors_name_the_setting(tmp_path):
    base = ["--config", "pi0_libero", "--checkpoint-dir", str(tmp_path / "run")]
    code, _, err = run_cli(*base)
    assert code == 2 and err.strip() == (
        "keras-openpi train: error: config 'pi0_libero' starts from openpi's pi0_base params: give "
        "their path with --set weights=PATH (nothing is downloaded)."
    )
    random_init = sets("base_weights=", "tokenizer=byte")
    code, _, err = run_cli(*base, *random_init)
    assert code == 2 and err.strip() == (
        "keras-openpi train: error: config 'pi0_libero' trains on a lerobot dataset: give its "
        "directory with --set data.path=DIR."
    )
    code, _, err = run_cli(*base, *random_init, *sets(f"data.path={tmp_path / 'nope'}"))
    assert (
        code == 2
        and err.strip()
        == f"keras-openpi train: error: data.path {tmp_path / 'nope'} does not exist."
    )
    code, _, err = run_cli(*base, *sets("base_weights=", f"tokenizer={tmp_path / 'missing.model'}"))
    assert code == 2 and err.startswith(
        f"keras-openpi train: error: no SentencePiece model at {tmp_path / 'missing.model'}"
    )


def test_pi0_fast_tokenizer_and_model_errors_name_the_setting(tmp_path):
    base = ["--config", "pi0_fast_demo", "--checkpoint-dir", str(tmp_path / "run")]
    model = tmp_path / "paligemma_tokenizer.model"
    model.write_bytes(b"")
    cases = [
        ([], "config 'pi0_fast_demo' needs the PaliGemma tokenizer: --set tokenizer="),
        (
            ["tokenizer=byte"],
            "config 'pi0_fast_demo' trains π0-FAST, whose action tokens are PaliGemma "
            "SentencePiece ids: the byte tokenizer cannot write them",
        ),
        (
            [f"tokenizer={model}"],
            "config 'pi0_fast_demo' trains π0-FAST: give its FAST action tokenizer with --set "
            "fast_tokenizer=DIR",
        ),
        (
            [f"tokenizer={model}", f"fast_tokenizer={tmp_path / 'fast'}"],
            f"fast_tokenizer {tmp_path / 'fast'} is not a directory",
        ),
        (
            ["model.action_expert_variant=\"dummy\""],
            "config 'pi0_fast_demo': its pi0_fast model (Pi0Fast) cannot be built from model=",
        ),
    ]
    for overrides, message in cases:
        code, _, err = run_cli(*base, *sets(*overrides))
        assert code == 2 and err.startswith(f"keras-openpi train: error: {message}"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "stats, message",
    [
        (
            {"state": (2, 0.0), "actions": (3, 0.0)},
            "the norm stats from {path} have 2 dims for 'state' but the data's 'state' has 3: "
            "recompute them (delete the file or set data.norm_stats).",
        ),
        (
            {"state": (3, 0.0), "actions": (9, 0.0)},
            "the norm stats from {path} have 9 dims for 'actions' but the data's 'actions' has 3: "
            "recompute them (delete the file or set data.norm_stats).",
        ),
        (
            {"state": (3, 0.0)},
            "the norm stats from {path} have no 'actions' (they have ['state']): they are not "
            "this data's; recompute them (delete the file or set data.norm_stats).",
        ),
    ],
)
def test_norm_stats_that_do_not_match_the_data_fail_before_building(tmp_path, stats, message):
    path = tmp_path / "norm_stats.json"
    payload = {
        key: {"mean": [mean] * dim, "std": [1.0] * dim} for key, (dim, mean) in stats.items()
    }
    path.write_text(json.dumps({"norm_stats": payload}))
    code, _, err = run_cli(
        "--config",
        "demo",
        "--checkpoint-dir",
        str(tmp_path / "run"),
        *sets(*TINY_SETS, f"data.norm_stats={path}"),
    )
    assert code == 2 and err == f"keras-openpi train: error: {message.format(path=path)}\n"
    assert not (tmp_path / "run").exists()


def test_non_finite_norm_stats_fail_before_building(tmp_path):
    path = tmp_path / "norm_stats.json"
    payload = {"state": {"mean": [np.nan] * 3, "std": [1.0] * 3}}
    payload["actions"] = {"mean": [0.0] * 3, "std": [1.0] * 3}
    path.write_text(json.dumps({"norm_stats": payload}))
    code, _, err = run_cli(
        "--config",
        "demo",
        "--checkpoint-dir",
        str(tmp_path / "run"),
        *sets(*TINY_SETS, f"data.norm_stats={path}"),
    )
    assert code == 2 and err.startswith(
        f"keras-openpi train: error: {path}: entry 'state': NormStats 'mean' holds nan at "
        "dimension 0: norm stats must be finite"
    )
    assert not (tmp_path / "run").exists()


def test_demo_config_trains_exports_and_serves(tmp_path):
    run = tmp_path / "run"
    args = ["--config", "demo", "--checkpoint-dir", str(run), "--max-steps", "2"]
    args += sets(*TINY_SETS, "batch_size=4", f"assets_dir={tmp_path / 'assets'}")
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert f"serve it: keras-openpi serve {run / 'export' / 'policy.keras'}" in out
    assert [row["step"] for row in read_metrics(run / "metrics.csv")] == [1, 2]
    assert (tmp_path / "assets" / "demo" / "procedural_reach" / "norm_stats.json").is_file()
    assert (run / "2" / "assets" / "procedural_reach" / "norm_stats.json").is_file()
    with zipfile.ZipFile(run / "export" / "policy.keras") as archive:
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        assert "optimizer" not in weights  # the policy alone, no Adam state

    frame = ProceduralDataset(1, image_size=32)[0]
    observation = {"image": frame["image"], "state": frame["state"], "prompt": frame["prompt"]}
    actions = [
        Policy.from_checkpoint(path, seed=0, fixed_noise=True).infer(observation)["actions"]
        for path in (run, run / "2", run / "export" / "policy.keras")
    ]
    assert actions[0].shape == (10, 8)
    np.testing.assert_allclose(actions[0], actions[1])
    np.testing.assert_allclose(actions[0], actions[2], rtol=1e-5, atol=1e-6)

    code, _, err = run_cli(*args)
    assert code == 2 and "already holds checkpoints (steps [2]): pass --resume" in err
