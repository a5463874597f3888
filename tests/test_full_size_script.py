"""benchmarks/full_size.py end to end on its tiny variant, and its random openpi checkpoint."""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import fixture_path

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import full_size  # noqa: E402
from random_openpi_checkpoint import write_random_checkpoint  # noqa: E402

STAGES = [
    "checkpoint",
    "convert",
    "zip check",
    "load",
    "load (for fine-tuning)",
    "lora",
    "fit (1 step, batch 1)",
    "save",
    "serve: load + compile",
    "serve: 1 request",
]


def test_the_tiny_variant_runs_every_stage(tmp_path):
    workdir, output = tmp_path / "work", tmp_path / "full_size.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), KERAS_BACKEND="jax")
    command = [sys.executable, str(BENCHMARKS / "full_size.py"), "--variant", "tiny"]
    command += ["--workdir", str(workdir), "--json", str(output)]
    # About 2.5 CPU minutes (six fresh processes: imports and compiles); far more wall time on a busy machine.
    run = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=2400, check=False
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(output.read_text())
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == STAGES
    for stage in result["stages"]:
        assert stage["seconds"] >= 0 and 0 < stage["peak_rss_gib"] < 24, stage
        assert stage["peak_rss_gib"] <= stage["process_peak_rss_gib"] + 0.01, stage
    config = full_size.VARIANTS["tiny"]
    serve = stages["serve: 1 request"]
    assert serve["actions_shape"] == [config["action_horizon"], config["action_dim"]]
    assert serve["actions_finite"] is True
    assert stages["checkpoint"]["parameters"] == stages["convert"]["parameters"]
    assert stages["checkpoint"]["parameters"] == stages["load"]["parameters"]
    lora = stages["lora"]
    assert (
        lora["trainable_parameters"] + lora["frozen_parameters"]
        > stages["load"]["parameters"]
    )
    # The training configs' LoRA: rematerialized (without it the step keeps a
    # float32 copy of every frozen kernel): the one Gemma decoder block (VLM and
    # action expert) and the one SigLIP block of the tiny variant.
    assert result["strategy"] == dict(
        name="lora", frozen_dtype="bfloat16", freeze_vision=False, remat=True
    )
    assert lora["rematerialized_layers"] == 2
    assert np.isfinite(stages["fit (1 step, batch 1)"]["loss"])
    assert result["command"].startswith("python benchmarks/full_size.py --variant tiny --workdir")
    assert result["machine"]["cores"] >= 1 and result["machine"]["ram_gib"] > 0
    assert "tiny" in run.stdout and "serve: 1 request" in run.stdout  # the table
    assert not any(workdir.rglob("*.keras")) and not (workdir / "openpi").exists()


def test_the_random_checkpoint_has_openpis_paths_and_shapes(tmp_path):
    config = dict(
        paligemma_variant="dummy",
        action_expert_variant="dummy",
        vision_variant="tiny/16",
        vocabulary_size=1024,
        action_dim=8,
    )
    counts = write_random_checkpoint(tmp_path / "params", config, dtype="bfloat16")
    import orbax.checkpoint as ocp

    from keras_openpi.convert import load_openpi_params

    metadata = ocp.PyTreeCheckpointer().metadata(str(tmp_path / "params"))
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    loaded = load_openpi_params(tmp_path / "params")
    with np.load(fixture_path("pi0.npz")) as data:
        expected = {
            k[len("params/") :]: data[k].shape
            for k in data.files
            if k.startswith("params/")
        }
    assert {k: v.shape for k, v in loaded.items()} == expected
    assert counts["parameters"] == sum(int(np.prod(s)) for s in expected.values())
    assert counts["bytes"] == 2 * counts["parameters"]  # every array stored in bfloat16
    stored = tree["params"]["PaliGemma"]["llm"]["embedder"]["input_embedding"]
    assert str(stored.dtype) == "bfloat16"
    embedding = loaded["PaliGemma/llm/embedder/input_embedding"]
    assert embedding.dtype.name == "bfloat16"  # read as stored: the tree is held once
    assert 0.015 < float(np.std(embedding.astype(np.float32))) < 0.025


def test_the_zip_report_refuses_a_file_past_4_gib_without_zip64_records(tmp_path):
    small = tmp_path / "small.keras"
    with zipfile.ZipFile(small, "w") as archive:
        archive.writestr("config.json", "{}")
    assert full_size.zip_report(small) == dict(
        file_gib=0.0, zip64=False, members={"config.json": 2}
    )
    big = (
        tmp_path / "big.keras"
    )  # sparse: 4 GiB of holes, then a zip without zip64 records
    with open(big, "wb") as handle:
        handle.seek(2**32)
        handle.write(small.read_bytes())
    with pytest.raises(
        ValueError, match=r"big.keras is 4.00 GiB but has no zip64 end records"
    ):
        full_size.zip_report(big)


def test_the_stage_processes_get_the_strategy_flags(tmp_path):
    args = argparse.Namespace(
        variant="tiny", workdir=tmp_path, params_dtype="bfloat16", freeze_vision=True, remat=False
    )
    command = full_size._stage_command(args, "finetune", tmp_path / "finetune.json")
    assert command[-2:] == ["--freeze-vision", "--no-remat"]
    args.freeze_vision, args.remat = False, True
    command = full_size._stage_command(args, "finetune", tmp_path / "finetune.json")
    assert command[-2:] == ["--params-dtype", "bfloat16"]


def test_a_used_workdir_is_refused(tmp_path):
    (tmp_path / "something").write_text("")
    with pytest.raises(SystemExit):
        full_size.main(["--variant", "tiny", "--workdir", str(tmp_path)])
