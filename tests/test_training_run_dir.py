"""The run directory: `--overwrite` removes only a run's files; a full disk stops a run cleanly."""

import contextlib
import errno
import io
import os
import re

import keras
import numpy as np

from keras_openpi.cli import main
from keras_openpi.training import AdamW
from keras_openpi.training import CheckpointManager
from keras_openpi.training import checkpoints
from keras_openpi.training.run_dir import run_entries
from training_support import TINY_SETS


def train_cli(run, *args):
    sets = [*TINY_SETS, "batch_size=4", "save_interval=1", f"assets_dir={run.parent / 'assets'}"]
    argv = ["train", "--config", "demo", "--checkpoint-dir", str(run), "--max-steps", "2"]
    argv += [arg for item in sets for arg in ("--set", item)] + list(args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def listing(directory):
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def previous_run(run):
    """What an earlier run (and an interrupted one) leaves in `run`."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="small")
    model.compile(optimizer=AdamW(0.1), loss="mse")
    model.optimizer.build(model.trainable_variables)
    CheckpointManager(run).save(20, model)
    (run / "7.skipped").mkdir()
    (run / "7.skipped" / "model.json").write_text("{}")
    (run / ".partial-21-0123abcd").mkdir()
    for name in ("metrics.csv", "metrics_superseded.csv", "train_config.json"):
        (run / name).write_text("step\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")
    (run / "export").mkdir()
    for name in ("policy.keras", "norm_stats.json", "manifest.json"):
        (run / "export" / name).write_text("")


def test_overwrite_refuses_a_directory_holding_other_files_and_removes_nothing(tmp_path):
    run = tmp_path / "run"
    previous_run(run)
    (run / "notes.txt").write_text("my notes")
    (run / "20" / "plot.png").write_bytes(b"png")  # a user's file in a step folder
    before = listing(run)
    code, _, err = train_cli(run, "--overwrite")
    assert code == 2 and err == (
        f"keras-openpi train: error: --overwrite removes only what keras-openpi train writes, and "
        f"{run} also holds 20, notes.txt: move them away or choose another --checkpoint-dir.\n"
    )
    assert listing(run) == before and (run / "notes.txt").read_text() == "my notes"
    (run / "file").write_text("")
    code, _, err = train_cli(run / "file", "--overwrite")
    assert code == 2 and err.endswith(
        f"--checkpoint-dir {run / 'file'} is a file, not a directory.\n"
    )


def test_a_new_run_refuses_a_directory_with_a_previous_runs_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step\n")
    code, _, err = train_cli(run)
    assert code == 2 and err == (
        f"keras-openpi train: error: {run} already holds a run's files (metrics.csv): pass "
        "--resume to continue that run or --overwrite to start over.\n"
    )


def test_overwrite_removes_the_previous_run_and_a_full_disk_stops_the_next_cleanly(
    tmp_path, monkeypatch
):
    run = tmp_path / "run"
    previous_run(run)
    assert run_entries(run) == (sorted(os.listdir(run)), [])
    write = checkpoints.write_items

    def disk_full_at_step_2(path, items):
        write(path, items)
        if path.parent.name == ".partial-2":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints, "write_items", disk_full_at_step_2)
    code, _, err = train_cli(run, "--overwrite")
    assert code == 1
    assert re.fullmatch(
        rf"keras-openpi train: error: checkpoint 2 was not written: No space left on device while "
        rf"writing {re.escape(str(run))}/\.partial-2/arrays; nothing of it "
        rf"was left behind and the newest checkpoint is {re.escape(str(run / '1'))}\.\n",
        err,
    ), err
    # The previous run is gone, the new one stopped after its checkpoint 1: no partial
    # folder, no export.
    assert sorted(os.listdir(run)) == ["1", "metrics.csv", "tensorboard", "train_config.json"]
    assert CheckpointManager(run).steps() == [1]
    assert len(list((run / "tensorboard").iterdir())) == 1
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,grad_norm,learning_rate" and len(rows) == 3
    assert np.isfinite(float(rows[2].split(",")[1]))
