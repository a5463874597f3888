"""Distribution on 8 virtual CPU devices: shardings, data-parallel and FSDP losses, batch checks.

XLA's device count is fixed when JAX initializes, so the checks run in a
subprocess started with `--xla_force_host_platform_device_count=8`.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from keras_openpi.training.distribution import check_batch_size
from keras_openpi.training.distribution import fsdp_axis

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import contextlib, io, json, os, sys, tempfile
import keras, numpy as np, jax
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from training_support import TINY_MODEL, TINY_SETS, tiny_observation
from keras_openpi.cli import main
from keras_openpi.finetuning import shapes_only
from keras_openpi.models import Pi0
from keras_openpi.training import AdamW, CheckpointManager, make_distribution

out = {"devices": len(jax.devices())}
x, y = tiny_observation(16, seed=1)


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def build(distribution, initial=None):
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        keras.utils.set_random_seed(0)
        model = Pi0(**TINY_MODEL, seed=0)
        if initial is not None:
            for variable, value in zip(model.variables, initial):
                variable.assign(value)
        model.compile(optimizer=AdamW(1e-3, use_ema=True), jit_compile=True)
    return model


def fit(model, distribution):
    losses = StepLosses()
    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[losses])
    return losses.losses


single = build(None)
initial = [np.array(v.numpy()) for v in single.variables]
out["single"] = fit(single, None)

data_parallel = make_distribution(fsdp_devices=1)
dp = build(data_parallel, initial)
out["dp_kind"] = type(data_parallel).__name__
out["dp_replicated"] = all(v.value.sharding.is_fully_replicated for v in dp.variables)
out["dp"] = fit(dp, data_parallel)

with shapes_only():
    variables = Pi0(**TINY_MODEL, seed=0).variables
fsdp = make_distribution(variables, fsdp_devices=8, min_bytes=0)
sharded = build(fsdp, initial)
def spec(variable):
    return [None if a is None else str(a) for a in variable.value.sharding.spec]


specs = {v.path: spec(v) for v in sharded.variables}
out["fsdp_kind"] = type(fsdp).__name__
out["specs"] = specs
out["fsdp"] = fit(sharded, fsdp)
moments = {v.path: spec(v) for v in sharded.optimizer.variables}
out["moment_specs"] = moments

directory = tempfile.mkdtemp()
manager = CheckpointManager(directory)
manager.save(2, sharded)
restored = build(fsdp)
restored.optimizer.build(restored.trainable_variables)
manager.restore(restored)
out["restored_equal"] = all(
    np.array_equal(np.asarray(a.value), np.asarray(b.value))
    for a, b in zip(sharded.variables, restored.variables)
)
out["restored_sharding_kept"] = all(
    a.value.sharding == b.value.sharding for a, b in zip(sharded.variables, restored.variables)
)

stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    sets = [a for s in [*TINY_SETS, "batch_size=6"] for a in ("--set", s)]
    code = main(["train", "--config", "demo", *sets])
out["cli_code"] = code
out["cli_error"] = stderr.getvalue()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def result():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", KERAS_BACKEND="jax"
    )
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_data_parallel_loss_equals_the_single_device_loss(result):
    assert result["devices"] == 8
    assert result["dp_kind"] == "DataParallel" and result["dp_replicated"]
    assert len(result["single"]) == 2
    for single, parallel in zip(result["single"], result["dp"]):
        assert parallel == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_fsdp_shards_large_weights_along_their_largest_axis(result):
    specs = result["specs"]
    block = "pi0/gemma/decoder_block_0/vlm"
    assert result["fsdp_kind"] == "ModelParallel"
    # query (N=2, D=32, H=16): along the width; never the heads.
    assert specs[f"{block}/attention/query/kernel"] == [None, "batch", None]
    # MQA key / value (K=1, D=32, H=16): along the width, not the single head.
    assert specs[f"{block}/attention/key/kernel"] == [None, "batch", None]
    assert specs[f"{block}/attention/value/kernel"] == [None, "batch", None]
    assert specs[f"{block}/feed_forward/gate/kernel"] == [None, "batch"]  # (32, 64)
    # (259, 32): 259 does not divide over 8, so the next largest axis.
    assert specs["pi0/gemma/token_embedding/embeddings"] == [None, "batch"]
    assert specs[f"{block}/pre_attention_norm/scale"] == [None]  # vectors replicated
    # Adam moments follow their weight.
    momentum = [
        k
        for k in result["moment_specs"]
        if "decoder_block_0_vlm_attention_key_kernel_momentum" in k
    ]
    assert momentum and result["moment_specs"][momentum[0]] == [None, "batch", None]


def test_fsdp_loss_equals_the_single_device_loss(result):
    for single, sharded in zip(result["single"], result["fsdp"]):
        assert sharded == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_sharded_checkpoints_restore_values_and_shardings(result):
    assert result["restored_equal"] and result["restored_sharding_kept"]


def test_batch_size_not_divisible_by_devices_fails_in_the_cli(result):
    assert result["cli_code"] == 2
    assert result["cli_error"].strip().splitlines() == [
        "keras-openpi train: error: batch_size 6 is not divisible by the 8 data-parallel devices "
        "(8 devices, fsdp_devices=1); choose a multiple of 8."
    ]


def test_fsdp_axis_and_batch_checks():
    assert (
        fsdp_axis((1, 4096, 256), "float32", 8) == 1
    )  # a one-head key kernel: never the head axis
    assert (
        fsdp_axis((1, 2048, 256), "float32", 8) is None
    )  # gemma_2b's: 2 MiB, replicated (openpi too)
    assert fsdp_axis((8, 2048, 256), "float32", 8) == 1  # the largest divisible axis
    assert fsdp_axis((257152, 2048), "bfloat16", 8) == 0
    assert fsdp_axis((1024, 1024), "float32", 8) == 0  # 4 MiB: the threshold
    assert fsdp_axis((1024, 1023), "float32", 8) is None  # smaller: replicated
    assert fsdp_axis((2048,), "float32", 8) is None
    assert fsdp_axis((1000, 1000), "float32", 1) is None
    with pytest.warns(UserWarning, match=r"no axis of shape \(1999, 1001\) divides over 8"):
        assert fsdp_axis((1999, 1001), "float32", 8) is None
    check_batch_size(32, 8)
    check_batch_size(2, 8, fsdp_devices=4)  # data split over 8 / 4 = 2
    with pytest.raises(ValueError, match="fsdp_devices=3 must divide the 8 devices"):
        check_batch_size(32, 8, fsdp_devices=3)
