"""Several processes: 2 processes × 4 CPU devices train as 1 × 8, and their checkpoints move.

JAX's multi-controller runtime on one machine: two `keras-openpi train`
processes with `--coordinator localhost:PORT --num-processes 2
--process-id I`, each with 4 virtual CPU devices
(`--xla_force_host_platform_device_count=4`; JAX's CPU collectives are
gloo), against one process with 8. The same tiny π0 and data, 10 steps,
data parallel and FSDP (every weight sharded: the shard threshold is 0
here). Then the 2-process FSDP run's step-5 checkpoint resumes in one
process with 4 devices (8 devices → 4, 2 processes → 1), and serving
loads its step 10 in this process (1 device).
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from keras_openpi.backend.multiprocess import initialize
from keras_openpi.backend.multiprocess import launched_processes
from keras_openpi.cli import main
from keras_openpi.training import load_checkpoint_model
from keras_openpi.training import read_metrics
from training_support import TINY_SETS

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10

# Runs `keras-openpi train` for each argument list of argv[1] (JSON), with every weight
# sharded under FSDP, then (argv[2] == "shards") checks that each process's part of a
# batch assembles into the one-process batch.
SCRIPT = r"""
import json, sys
import keras_openpi.training.distribution as distribution
from keras_openpi.cli import main

distribution.MIN_SHARD_BYTES = 0  # the tiny model's weights are sharded too
out = {"codes": [main(args) for args in json.loads(sys.argv[1])]}
if sys.argv[2] == "shards":
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from keras_openpi.data.loader import DataLoader
    from keras_openpi.data.procedural_source import ProceduralDataset

    source = ProceduralDataset(3, image_size=32)
    whole = DataLoader(source, 8, seed=3, model_inputs=False, workers=1)
    out["shards"], out["same"] = {}, {}
    for fsdp in (1, 2, 4, 8):
        shard = distribution.data_shard(8, fsdp)
        part = DataLoader(source, 8, seed=3, shard=shard, model_inputs=False, workers=1)
        mesh_distribution = distribution.make_distribution([], fsdp, min_bytes=0)
        same = True
        for index in (0, 5):
            local = part[index]["actions"]
            layout = mesh_distribution.get_data_layout(local.shape).backend_layout
            batch = jax.make_array_from_process_local_data(layout, local)
            gathered = multihost_utils.process_allgather(batch, tiled=True)
            same = same and bool(np.array_equal(gathered, whole[index]["actions"]))
        out["shards"][fsdp], out["same"][fsdp] = shard, same
print("RESULT " + json.dumps(out))
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def train_args(run_dir, assets, *extra):
    sets = [
        *TINY_SETS,
        "batch_size=8",
        "save_interval=5",
        "keep_last=2",
        "tensorboard=false",
        "num_workers=2",
        f"assets_dir={assets}",
    ]
    args = ["train", "--config", "demo", "--checkpoint-dir", str(run_dir), "--max-steps", "10"]
    return args + [a for s in sets for a in ("--set", s)] + list(extra)


def launch(runs, devices, process=None, coordinator=None, check_shards=False):
    """Starts the script in a subprocess with `devices` CPU devices; returns the Popen."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        KERAS_BACKEND="jax",
    )
    if process is not None:
        hosts = ["--coordinator", coordinator, "--num-processes", "2", "--process-id", str(process)]
        runs = [[*args, *hosts] for args in runs]
    mode = "shards" if check_shards else "train"
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(runs), mode],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes, timeout=1200):
    """Waits for all; kills the others when one fails. Returns each one's RESULT dict."""
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
            assert process.returncode == 0 and lines, err[-4000:]
            result = json.loads(lines[-1][len("RESULT ") :])
            assert not any(result["codes"]), err[-4000:]
            results.append(result)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    assets = base / "assets"
    kinds = {"dp": [], "fsdp": ["--set", "fsdp_devices=8"]}
    # One process, 8 devices (it also writes the norm stats the others read).
    (one,) = finish(
        [launch([train_args(base / "one" / k, assets, *a) for k, a in kinds.items()], 8)]
    )
    # Two processes, 4 devices each.
    coordinator = f"localhost:{free_port()}"
    two = finish(
        [
            launch(
                [train_args(base / "two" / k, assets, *a) for k, a in kinds.items()],
                4,
                process=index,
                coordinator=coordinator,
                check_shards=True,
            )
            for index in (0, 1)
        ]
    )
    # The 2-process FSDP run's step-5 checkpoint, continued by one process on 4 devices.
    resumed = base / "resumed"
    shutil.copytree(base / "two" / "fsdp", resumed)
    shutil.rmtree(resumed / "10")
    shutil.rmtree(resumed / "export")
    resume = train_args(resumed, assets, "--set", "fsdp_devices=4", "--resume")
    (moved,) = finish([launch([resume], 4)])
    return {"base": base, "one": one, "two": two, "moved": moved}


def losses(run_dir):
    rows = read_metrics(run_dir / "metrics.csv")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return [row["loss"] for row in rows]


@pytest.mark.slow
def test_each_process_loads_its_rows_and_the_global_batch_is_the_one_process_batch(runs):
    zero, one = runs["two"]
    # fsdp 1 and 8: a 1-D mesh; 4: (2, 4), each process one batch row; 2: (4, 2).
    assert {k: tuple(v) for k, v in zero["shards"].items()} == dict.fromkeys("1248", (0, 2))
    assert {k: tuple(v) for k, v in one["shards"].items()} == dict.fromkeys("1248", (1, 2))
    assert all(zero["same"].values()) and all(one["same"].values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dp", "fsdp"])
def test_two_processes_log_the_one_process_losses(runs, kind):
    base = runs["base"]
    single, double = losses(base / "one" / kind), losses(base / "two" / kind)
    np.testing.assert_allclose(double, single, rtol=0, atol=1e-5)
    assert single[-1] < single[0]  # it trains


@pytest.mark.slow
def test_every_process_writes_its_shards_and_the_manifest_lists_them(runs):
    step_dir = runs["base"] / "two" / "fsdp" / "10"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    state = json.loads((step_dir / "state.json").read_text())
    assert state["processes"] == 2 and state["data"]["next_batch"] == STEPS
    for item in ("model_weights", "optimizer"):
        for process in (0, 1):
            data = f"arrays/{item}/ocdbt.process_{process}/d/"
            assert any(name.startswith(data) for name in manifest["files"]), (item, process)
    assert not list(step_dir.parent.glob(".*"))  # no hidden folder left
    assert (runs["base"] / "two" / "fsdp" / "export" / "policy.keras").is_file()


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process_with_half_the_devices(runs):
    base = runs["base"]
    want, got = losses(base / "two" / "fsdp"), losses(base / "resumed")
    assert got[:5] == want[:5]  # rows of the first run, kept
    np.testing.assert_allclose(got[5:], want[5:], rtol=0, atol=1e-5)
    # Serving loads a 2-process checkpoint in this process (1 device): the same weights.
    a = load_checkpoint_model(base / "two" / "fsdp" / "10")
    b = load_checkpoint_model(base / "resumed" / "10")
    for x, y in zip(a.variables, b.variables):
        np.testing.assert_allclose(np.asarray(x.numpy()), np.asarray(y.numpy()), atol=1e-5)


SLURM = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "3",
}


def test_the_launches_jax_and_keras_read_are_recognized():
    assert launched_processes({}) == 1
    assert launched_processes(SLURM) == 16
    assert launched_processes({**SLURM, "SLURM_NTASKS": "1"}) == 1  # one task: one process
    assert launched_processes({"SLURM_NTASKS": "4"}) == 1  # an allocation, not an srun step
    assert launched_processes({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert launched_processes({"KERAS_DISTRIBUTION_NUM_PROCESSES": "4"}) == 4
    # Nothing asked and nothing launched, or --num-processes 1 even under srun: one process.
    assert initialize(environ={}) == 1
    assert initialize(num_processes=1, environ=SLURM) == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--num-processes", "2", "--process-id", "2"],
            "--process-id must be in [0, 2) for --num-processes 2, got 2.",
        ),
        (["--num-processes", "0"], "--num-processes must be at least 1, got 0."),
        (
            ["--num-processes", "1", "--process-id", "1"],
            "--process-id 1 with --num-processes 1: use 0.",
        ),
        (
            ["--coordinator", "host0", "--num-processes", "2", "--process-id", "0"],
            "--coordinator takes HOST:PORT (process 0's), got 'host0'.",
        ),
        (
            ["--coordinator", "host0:1234"],
            "several processes need --num-processes and --process-id too (or a launcher JAX "
            "reads, such as srun or mpirun): give every process the same --coordinator and "
            "--num-processes and its own --process-id.",
        ),
    ],
)
def test_malformed_process_flags_fail_before_anything_starts(tmp_path, flags, message, capsys):
    args = ["train", "--config", "demo", "--checkpoint-dir", str(tmp_path / "run"), *flags]
    assert main(args) == 2
    assert capsys.readouterr().err == f"keras-openpi train: error: {message}\n"
    assert not (tmp_path / "run").exists()
