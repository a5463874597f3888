"""π0 speed on this machine: one AdamW training step and one `sample_actions` call.

The configuration is the small π0 that openpi's and LeRobot's figures were
measured with (94,886,688 parameters): VLM width 256 / depth 6 / mlp 1024 /
8 heads / 1 kv head / head_dim 32, action expert width 128 / mlp 512, SigLIP
S/16, vocabulary 257152, batch 4, three 224x224 cameras, action_dim 32,
horizon 50, max_token_len 48, float32.

The train step is the one `fit` runs (`model.train_on_batch` after
`model.compile(optimizer=AdamW)`: loss, gradients, AdamW update of every
weight); the sampler is `model.sample_actions(obs, num_steps=10)`. Both are
timed after compilation (compile time is reported separately), blocking until
the results are on the host; the JSON holds the median, min and max of
`--repeats` runs, in wall-clock seconds and in CPU seconds of this process
(all threads: on a machine shared with other work the wall time varies with
the load, the CPU time much less).

By default the process keeps freed memory for reuse
(`keras_openpi.backend.retain_freed_memory`), as a CPU training process
should; `--system-allocator` measures with glibc's defaults instead.

With `--openpi-python` and `--openpi-src`, openpi's own JAX π0 is timed the
same way right after (`openpi_pi0_speed.py`, in its own environment, with
glibc's default allocator as openpi runs), and the JSON holds the ratios
measured under the same machine load.

Usage:
    python benchmarks/pi0_speed.py [--json PATH] [--repeats N] [--system-allocator]
        [--openpi-python PYTHON --openpi-src DIR]
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np

from keras_openpi.backend import retain_freed_memory
from keras_openpi.models import Pi0

VLM = dict(width=256, depth=6, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=32)
EXPERT = dict(width=128, depth=6, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=32)
CONFIG = dict(
    paligemma_variant=VLM,
    action_expert_variant=EXPERT,
    vision_variant="S/16",
    vocabulary_size=257_152,
    action_dim=32,
    action_horizon=50,
    max_token_len=48,
)
BATCH = 4
EXPECTED_PARAMETERS = 94_886_688
NUM_STEPS = 10

# Measured on this machine kind for exactly this configuration (seconds).
REFERENCE = {
    "openpi_jax": {"train_step_s": 9.8, "sample_s": 2.16},
    "lerobot_torch_eager_2_threads": {"train_step_s": 8.77, "sample_s": 2.05},
    "lerobot_torch_compile_max_autotune_2_threads": {
        "train_step_s": 6.98,
        "sample_s": 1.95,
    },
}


def make_batch(model, rng):
    """A random observation and action chunk with the model's shapes."""
    height, width = model.image_resolution
    observation = {
        "image": {
            key: rng.uniform(-1, 1, (BATCH, height, width, 3)).astype("float32")
            for key in model.image_keys
        },
        "image_mask": {key: np.ones((BATCH,), bool) for key in model.image_keys},
        "state": rng.normal(size=(BATCH, model.action_dim)).astype("float32"),
        "tokenized_prompt": rng.integers(
            0, model.vocabulary_size, (BATCH, model.max_token_len)
        ).astype("int32"),
        "tokenized_prompt_mask": np.arange(model.max_token_len)[None, :]
        < rng.integers(8, model.max_token_len, (BATCH, 1)),
    }
    actions = rng.normal(size=(BATCH, model.action_horizon, model.action_dim))
    return observation, actions.astype("float32")


def timed(fn, repeats):
    """Runs `fn` once (compilation + run), then `repeats` times; returns seconds."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    return {
        "median": median,
        "min": min(times),
        "max": max(times),
        "times": times,
        "cpu_median": statistics.median(cpu_times),
        # The first call compiles and runs once; its run part is about a median.
        "compile": max(first - median, 0.0),
    }


def run_openpi(python, source, repeats):
    """Runs `openpi_pi0_speed.py` in openpi's environment; returns its JSON."""
    script = pathlib.Path(__file__).parent / "openpi_pi0_speed.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "openpi.json"
        command = [python, str(script), "--openpi-src", source, "--json", str(out)]
        subprocess.run([*command, "--repeats", str(repeats)], check=True)
        return json.loads(out.read_text())


def machine_info():
    import jax

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_before": list(load) if load else None,
    }


def _cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json",
        default=str(pathlib.Path(__file__).parent / "results" / "pi0_speed.json"),
        help="where to write the results (default: benchmarks/results/pi0_speed.json)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (>= 5)")
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="keep glibc's default malloc settings (no retain_freed_memory)",
    )
    parser.add_argument("--openpi-python", help="python of an environment with openpi's pins")
    parser.add_argument("--openpi-src", help="an openpi checkout (with --openpi-python)")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be at least 5, got {args.repeats}")
    if bool(args.openpi_python) != bool(args.openpi_src):
        parser.error("--openpi-python and --openpi-src go together")
    retained = False if args.system_allocator else retain_freed_memory()

    info = machine_info()
    keras.utils.set_random_seed(0)
    model = Pi0(**CONFIG, seed=0)
    num_parameters = int(sum(np.prod(v.shape) for v in model.weights))
    print(f"Pi0 parameters: {num_parameters:,}")
    if num_parameters != EXPECTED_PARAMETERS:
        raise SystemExit(
            f"Expected {EXPECTED_PARAMETERS:,} parameters for this configuration, "
            f"got {num_parameters:,}."
        )
    observation, actions = make_batch(model, np.random.default_rng(0))

    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
    train = timed(lambda: model.train_on_batch(observation, actions), args.repeats)
    sample = timed(
        lambda: np.asarray(model.sample_actions(observation, num_steps=NUM_STEPS)),
        args.repeats,
    )

    results = {
        "model": "pi0",
        "config": {**CONFIG, "batch_size": BATCH, "dtype": "float32"},
        "num_parameters": num_parameters,
        "sample_num_steps": NUM_STEPS,
        "repeats": args.repeats,
        "train_step_s_median": train["median"],
        "train_step_s_min": train["min"],
        "train_step_s_max": train["max"],
        "train_step_s_all": train["times"],
        "train_step_cpu_s_median": train["cpu_median"],
        "train_compile_s": train["compile"],
        "sample_s_median": sample["median"],
        "sample_s_min": sample["min"],
        "sample_s_max": sample["max"],
        "sample_s_all": sample["times"],
        "sample_cpu_s_median": sample["cpu_median"],
        "sample_compile_s": sample["compile"],
        "retain_freed_memory": retained,
        "reference": REFERENCE,
        "speedup_vs_openpi_reference": {
            "train_step": REFERENCE["openpi_jax"]["train_step_s"] / train["median"],
            "sample": REFERENCE["openpi_jax"]["sample_s"] / sample["median"],
        },
        "machine": {**info, "load_average_after": list(os.getloadavg())},
    }
    if args.openpi_python:
        openpi = run_openpi(args.openpi_python, args.openpi_src, args.repeats)
        results["openpi_same_run"] = openpi
        results["speedup_vs_openpi_same_run"] = {
            "train_step": openpi["train_step_s_median"] / train["median"],
            "sample": openpi["sample_s_median"] / sample["median"],
        }
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")

    rows = [("keras_openpi (this run)", train["median"], sample["median"])]
    if args.openpi_python:
        openpi = results["openpi_same_run"]
        rows.append(
            ("openpi_jax (this run)", openpi["train_step_s_median"], openpi["sample_s_median"])
        )
    rows += [(name, r["train_step_s"], r["sample_s"]) for name, r in REFERENCE.items()]
    print(f"\n{'':46s} {'train step (s)':>15s} {'sample (s)':>11s}")
    for name, t, s in rows:
        print(f"{name:46s} {t:15.2f} {s:11.2f}")
    print(
        f"\ntrain min/max {train['min']:.2f}/{train['max']:.2f} s, CPU "
        f"{train['cpu_median']:.2f} s, compile {train['compile']:.1f} s; sample min/max "
        f"{sample['min']:.2f}/{sample['max']:.2f} s, CPU {sample['cpu_median']:.2f} s, "
        f"compile {sample['compile']:.1f} s; retain_freed_memory {retained}; load "
        f"average {info['load_average_before'][0]:.2f} -> "
        f"{results['machine']['load_average_after'][0]:.2f}"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
