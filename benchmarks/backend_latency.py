"""`sample_actions` latency of one π0 on JAX, PyTorch and TensorFlow.

Every backend runs in its own process (Keras fixes the backend at import) and
samples from the same weights: the JAX process builds the model (seed 0),
saves it as `.keras` and samples; the others load that file. Modes:

- `jax`: `jax.jit` (the default).
- `torch_eager`: PyTorch eager under `torch.no_grad()` (the default on PyTorch).
- `torch_compile`: `torch.compile` (`model.jit_compile = True`).
- `tensorflow_graph`: `tf.function` without XLA (the default on a CPU-only machine).
- `tensorflow_xla`: `tf.function(jit_compile=True)` (`model.jit_compile = True`; the
  default with a GPU).

Each mode is timed after a first call that compiles (its time is reported
as `first_call_s`), blocking until the actions are on the host, `--repeats`
times; the JSON holds median, min and max wall-clock seconds, the median CPU
seconds of the process, and the largest difference of the actions from
JAX's for the same noise. Configs: `demo` (the demo's π0, 293,320
parameters, 3 cameras at 96x96, batch 1) and `pi0_speed` (the 94,886,688
parameter π0 of `pi0_speed.py`, 3 cameras at 224x224, batch 4).

Usage:
    python benchmarks/backend_latency.py [--config demo pi0_speed] [--modes ...]
        [--repeats N] [--timeout S] [--json PATH]
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

HERE = pathlib.Path(__file__).resolve().parent
MODES = {
    "jax": ("jax", True),
    "torch_eager": ("torch", False),
    "torch_compile": ("torch", True),
    "tensorflow_graph": ("tensorflow", False),
    "tensorflow_xla": ("tensorflow", True),
}
NUM_STEPS = 10


def config(name):
    """`(Pi0 arguments, batch size)` of a named configuration."""
    sys.path.insert(0, str(HERE))
    if name == "demo":
        from keras_openpi.models.presets import DEMO_MODEL
        from keras_openpi.tokenizers import ByteTokenizer

        vocabulary_size = ByteTokenizer(DEMO_MODEL["max_token_len"]).vocabulary_size
        return dict(DEMO_MODEL, vocabulary_size=vocabulary_size), 1
    if name == "pi0_speed":
        import pi0_speed

        return dict(pi0_speed.CONFIG), pi0_speed.BATCH
    raise ValueError(f"Unknown config {name!r}; expected 'demo' or 'pi0_speed'.")


def inputs(model, batch):
    """A fixed random observation and starting noise with the model's shapes."""
    import numpy as np

    rng = np.random.default_rng(0)
    height, width = model.image_resolution
    length = model.max_token_len
    observation = {
        "image": {
            k: rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
            for k in model.image_keys
        },
        "image_mask": {k: np.ones((batch,), bool) for k in model.image_keys},
        "state": rng.normal(size=(batch, model.action_dim)).astype("float32"),
        "tokenized_prompt": rng.integers(1, model.vocabulary_size, (batch, length)).astype("int32"),
        "tokenized_prompt_mask": np.repeat((np.arange(length) < length // 2)[None], batch, 0),
    }
    noise = rng.normal(size=(batch, model.action_horizon, model.action_dim)).astype("float32")
    return observation, noise


def worker(args):
    """Times one mode in this process (KERAS_BACKEND is already set); prints one JSON line."""
    import keras
    import numpy as np

    from keras_openpi.models import Pi0

    backend, jit_compile = MODES[args.mode]
    assert keras.backend.backend() == backend, keras.backend.backend()
    directory = pathlib.Path(args.directory)
    arguments, batch = config(args.config)
    if args.mode == "jax":
        keras.utils.set_random_seed(0)
        model = Pi0(**arguments, seed=0)
        model.save(directory / "model.keras")
    else:
        model = keras.saving.load_model(directory / "model.keras")
    model.jit_compile = jit_compile
    observation, noise = inputs(model, batch)

    def sample():
        actions = model.sample_actions(observation, noise=noise, num_steps=NUM_STEPS)
        return keras.ops.convert_to_numpy(actions)

    start = time.perf_counter()
    actions = sample()
    first = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        sample()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if args.mode == "jax":
        np.save(directory / "jax_actions.npy", actions)
    reference = np.load(directory / "jax_actions.npy")
    result = {
        "mode": args.mode,
        "backend": backend,
        "jit_compile": jit_compile,
        "num_parameters": int(model.count_params()),
        "batch_size": batch,
        "first_call_s": first,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "all_s": times,
        "cpu_median_s": statistics.median(cpu_times),
        "max_abs_diff_vs_jax": float(np.abs(actions - reference).max()),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_mode(config_name, mode, directory, repeats, timeout):
    env = {**os.environ, "KERAS_BACKEND": MODES[mode][0]}
    command = [sys.executable, __file__, "--worker", mode, "--config", config_name]
    command += ["--directory", str(directory), "--repeats", str(repeats)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"did not finish in {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"mode": mode, "error": (done.stderr or done.stdout)[-2000:]}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_s"] = time.perf_counter() - start
    return result


def versions():
    import importlib.metadata as metadata

    names = ("keras", "jax", "torch", "tensorflow")
    return {name: metadata.version(name) for name in names}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["demo", "pi0_speed"], choices=["demo", "pi0_speed"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per mode (default 5)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per mode (default 1800)")
    parser.add_argument(
        "--json",
        default=str(HERE / "results" / "backend_latency.json"),
        help="where to write the results (default: benchmarks/results/backend_latency.json)",
    )
    parser.add_argument("--worker", choices=list(MODES), dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        args.config = args.config[0]
        return worker(args)
    if "jax" not in args.modes:
        parser.error("--modes must include jax: it writes the model the other backends load")
    modes = ["jax"] + [m for m in args.modes if m != "jax"]

    report = {
        "num_steps": NUM_STEPS,
        "repeats": args.repeats,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "load_average_before": list(os.getloadavg()),
        },
        "versions": versions(),
        "configs": {},
    }
    for name in args.config:
        with tempfile.TemporaryDirectory() as directory:
            results = {}
            for mode in modes:
                results[mode] = run_mode(name, mode, directory, args.repeats, args.timeout)
                result = results[mode]
                if "error" in result:
                    print(f"{name:9s} {mode:17s} FAILED: {result['error'].splitlines()[-1:]}")
                else:
                    print(
                        f"{name:9s} {mode:17s} median {result['median_s'] * 1000:9.1f} ms  "
                        f"first call {result['first_call_s']:7.1f} s  "
                        f"max |a - a_jax| {result['max_abs_diff_vs_jax']:.1e}",
                        flush=True,
                    )
        report["configs"][name] = results
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
