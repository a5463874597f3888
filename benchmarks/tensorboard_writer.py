"""Why the trainer writes TensorBoard scalars itself rather than with `keras.callbacks.TensorBoard`.

`keras.callbacks.TensorBoard` writes through `tf.summary` on every backend,
so a JAX training run that uses it imports TensorFlow. This measures, each
in a fresh process (as a training run pays it):

- `keras_callback`: import Keras, build `keras.callbacks.TensorBoard` and
  write `--steps` steps of three scalars through its writer (`tf.summary`,
  which also needs the `tensorboard` package: without it, `write_error`
  says so and the time and memory are those of TensorFlow alone);
- `event_writer`: import Keras and write the same scalars with
  `keras_openpi.training.tensorboard.EventWriter` (no TensorFlow).

For each: wall seconds, peak resident memory (MB), whether TensorFlow was
imported, and the bytes of the event files; the ratio keras / ours of the
seconds and memory is the figure that carries over between machines.

Usage:
    python benchmarks/tensorboard_writer.py [--steps N] [--json PATH]
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import json, os, pathlib, resource, sys, time
start = time.perf_counter()
import keras
mode, log_dir, steps = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
values = lambda step: {"loss": 1.0 / step, "grad_norm": 0.5, "learning_rate": 1e-4}
if mode == "keras_callback":
    callback = keras.callbacks.TensorBoard(log_dir=str(log_dir), update_freq="batch")
    import tensorflow as tf
    writer = tf.summary.create_file_writer(str(log_dir / "train"))
    try:
        with writer.as_default():
            for step in range(1, steps + 1):
                for name, value in values(step).items():
                    tf.summary.scalar(name, value, step=step)
        writes = None
    except Exception as error:  # tf.summary needs the `tensorboard` package too
        writes = f"{type(error).__name__}: {error}"
    writer.close()
else:
    from keras_openpi.training.tensorboard import EventWriter
    writer = EventWriter(log_dir)
    for step in range(1, steps + 1):
        writer.scalars(step, values(step))
    writer.close()
    writes = None
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "imported_tensorflow": "tensorflow" in sys.modules,
    "write_error": writes,
    "event_bytes": sum(p.stat().st_size for p in log_dir.rglob("*") if p.is_file()),
}))
"""


def measure(mode, steps):
    with tempfile.TemporaryDirectory() as log_dir:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, mode, log_dir, str(steps)],
            capture_output=True, text=True, cwd=ROOT,
            env={"KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT),
                 "PATH": "/usr/bin:/bin"},
        )
    if out.returncode:
        raise SystemExit(f"{mode} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", default=str(HERE / "results" / "tensorboard_writer.json"))
    args = parser.parse_args()
    results = {mode: measure(mode, args.steps) for mode in ("event_writer", "keras_callback")}
    ours, keras_ = results["event_writer"], results["keras_callback"]
    results["ratio_keras_to_ours"] = {
        "seconds": keras_["seconds"] / ours["seconds"],
        "peak_rss_mb": keras_["peak_rss_mb"] / ours["peak_rss_mb"],
    }
    results["steps"] = args.steps
    for mode in ("event_writer", "keras_callback"):
        r = results[mode]
        print(f"{mode:15s} {r['seconds']:6.2f} s  peak {r['peak_rss_mb']:7.0f} MB  "
              f"tensorflow imported: {r['imported_tensorflow']}  events {r['event_bytes']} B"
              + (f"  ({r['write_error']})" if r["write_error"] else ""))
    ratio = results["ratio_keras_to_ours"]
    print(f"keras.callbacks.TensorBoard / EventWriter: {ratio['seconds']:.1f}x time, "
          f"{ratio['peak_rss_mb']:.1f}x peak memory")
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
