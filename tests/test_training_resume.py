"""Resume and export after damage: fall back to the newest complete checkpoint, lose nothing."""

import contextlib
import dataclasses
import errno
import io
import json
import os
import re
import shutil

import keras
import numpy as np
import pytest

from keras_openpi.cli import main
from keras_openpi.training import CheckpointManager
from keras_openpi.training import Trainer
from keras_openpi.training import export as export_module
from keras_openpi.training import read_metrics
from training_support import tiny_demo_config


def config_for(tmp_path, **changes):
    # 8 steps, a checkpoint every 2 keeping the last 3 (4, 6, 8), EMA on.
    return tiny_demo_config(tmp_path, ema_decay=0.9, keep_last=3, **changes)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step run: `(directory, its final weights by path)`."""
    base = tmp_path_factory.mktemp("finished")
    trainer = Trainer(config_for(base), checkpoint_dir=base / "run", verbose=0, log=None)
    trainer.run()
    weights = {v.path: np.array(v.numpy()) for v in trainer.model.variables}
    return base / "run", weights


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished[0], tmp_path / "run")
    return tmp_path / "run"


def largest_file(folder):
    """The biggest file under `folder`, relative to its step directory (an array's data)."""
    path = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    return path.relative_to(folder.parents[1]).as_posix()


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def exported_weights(path):
    """The weights in a `.keras` policy (its noise generator's state is not among them)."""
    model = keras.saving.load_model(path)
    return {v.path: np.array(v.numpy()) for v in model.variables if "seed_generator" not in v.path}


def test_an_incomplete_newest_checkpoint_is_skipped_and_nothing_is_lost(finished, run, tmp_path):
    original_metrics = read_metrics(run / "metrics.csv")
    shutil.rmtree(run / "8" / "arrays" / "optimizer")  # the newest lacks its optimizer state
    lines = []
    result = Trainer(
        config_for(tmp_path), checkpoint_dir=run, resume=True, verbose=0, log=lines.append
    ).run()
    assert f"checkpoint {run / '8'} is not usable: arrays/optimizer is missing" in lines
    assert f"moved {run / '8'} to {run / '8.skipped'}" in lines
    assert any(line.startswith("resuming at step 6: 2 steps to step 8 of 8") for line in lines)
    assert result["step"] == 8
    assert (
        sorted((run / "8.skipped").iterdir())
        and not (run / "8.skipped" / "arrays" / "optimizer").exists()
    )
    assert CheckpointManager(run).steps() == [4, 6, 8]  # the new 8 is kept, nothing pruned early
    # metrics.csv is whole (steps 7 and 8 trained again, exactly as before); the first
    # attempt's rows 7-8 are kept in metrics_superseded.csv.
    metrics = read_metrics(run / "metrics.csv")
    assert [row["step"] for row in metrics] == list(range(1, 9))
    for got, want in zip(metrics, original_metrics):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert read_metrics(run / "metrics_superseded.csv") == original_metrics[6:]
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["step"] == 8 and manifest["format"] == "keras_openpi.policy_export/1"
    for path, value in exported_weights(run / "export" / "policy.keras").items():
        np.testing.assert_allclose(value, finished[1][path], atol=1e-6, err_msg=path)


@pytest.mark.parametrize("name", ["state.json", "weights"])
def test_a_corrupt_checkpoint_file_is_named_and_resume_falls_back(run, tmp_path, name):
    if name == "weights":
        name = largest_file(run / "8" / "arrays" / "model_weights")
    flip_last_byte(run / "8" / name)
    lines = []
    config = config_for(tmp_path, num_train_steps=10)
    trainer = Trainer(config, checkpoint_dir=run, resume=True, log=lines.append).prepare()
    assert trainer.start_step == 6 and trainer.loader.start == 6
    assert lines[:2] == [
        f"checkpoint {run / '8'} is not usable: {name} does not match its sha256 in "
        "manifest.json (corrupt)",
        "resuming from step 6, the newest complete checkpoint; the newer ones move to "
        "<step>.skipped",
    ]
    assert (run / "8").is_dir()  # moved aside only when training starts


def test_resume_refuses_settings_that_contradict_the_checkpoint(run, tmp_path):
    base = config_for(tmp_path, num_train_steps=10)
    contradicting = dataclasses.replace(
        base,
        model=dict(base.model, max_token_len=64),
        strategy={"name": "lora", "rank": 2},
        batch_size=2,
    )
    with pytest.raises(ValueError) as caught:
        Trainer(contradicting, checkpoint_dir=run, resume=True, log=None).prepare()
    assert str(caught.value) == (
        f"--resume: the config contradicts checkpoint {run / '8'}: batch_size is 2, the "
        "checkpoint's 4; model.max_token_len is 64, the checkpoint's 32; strategy is "
        "{'name': 'lora', 'rank': 2}, the checkpoint's 'full'. Resume with the checkpoint's "
        "settings, or start a new run (--overwrite or another --checkpoint-dir)."
    )
    lines = []
    changed = dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, peak_lr=1e-3))
    Trainer(changed, checkpoint_dir=run, resume=True, log=lines.append).prepare()
    assert (
        "resuming with changed settings: num_train_steps 10 (was 8); optimizer.peak_lr 0.001 "
        "(was 0.003)"
    ) in lines


def export_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export-policy", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def test_an_interrupted_export_is_redone(finished, run, tmp_path, monkeypatch):
    before = (run / "export" / "policy.keras").read_bytes()
    write_manifest = export_module.write_manifest

    def disk_full(directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_module, "write_manifest", disk_full)
    code, _, err = export_cli(run)
    assert code == 1
    assert re.fullmatch(
        rf"keras-openpi export-policy: error: the policy was not exported: No space left on "
        rf"device while writing {re.escape(str(run))}/\.partial-export-[0-9a-f]{{8}}/"
        rf"manifest\.json; "
        rf"nothing of it was left behind and {re.escape(str(run / 'export'))} is as it was\.\n",
        err,
    ), err
    assert (run / "export" / "policy.keras").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(export_module, "write_manifest", write_manifest)

    # The export gone (a crash before it was written): --resume of the finished run redoes it.
    shutil.rmtree(run / "export")
    lines = []
    result = Trainer(config_for(tmp_path), checkpoint_dir=run, resume=True, log=lines.append).run()
    assert result["history"] is None and result["step"] == 8
    assert lines[0] == (
        f"the run in {run} is finished at step 8 but its export is missing: exporting it"
    )
    for path, value in exported_weights(run / "export" / "policy.keras").items():
        np.testing.assert_allclose(value, finished[1][path], atol=1e-6, err_msg=path)
    with pytest.raises(ValueError, match="is at step 8 already and exported to"):
        Trainer(config_for(tmp_path), checkpoint_dir=run, resume=True, log=None).prepare()

    # export-policy RUN_DIR: the newest complete checkpoint, with its norm stats.
    shutil.rmtree(run / "export")
    corrupt = largest_file(run / "8" / "arrays" / "model_weights")
    flip_last_byte(run / "8" / corrupt)
    code, out, err = export_cli(run, "--output", tmp_path / "policy")
    assert code == 0, err
    assert err == (
        f"keras-openpi export-policy: warning: {run}: using checkpoint 6; skipped 8 "
        f"({corrupt} does not match its sha256 in manifest.json (corrupt)).\n"
    )
    assert out.splitlines()[0] == (
        f"exported checkpoint 6 to {tmp_path / 'policy' / 'policy.keras'} and its norm_stats.json"
    )
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == [
        "manifest.json",
        "norm_stats.json",
        "policy.keras",
    ]
    assert (tmp_path / "policy" / "norm_stats.json").read_text() == next(
        (run / "6" / "assets").glob("*/norm_stats.json")
    ).read_text()
    code, _, err = export_cli(run, "--step", 5)
    assert code == 2 and err == (
        f"keras-openpi export-policy: error: no checkpoint of step 5 in {run}; it has steps "
        "[4, 6, 8].\n"
    )
