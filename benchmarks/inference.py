"""`sample_actions` time per weight format, with the FLOP/s achieved against a plain matmul.

The configuration is `pi0_speed.py`'s small π0 (94.9 M parameters, batch 4,
three 224x224 cameras, horizon 50, 10 Euler steps). The sampler is timed
with float32 weights, bfloat16 weights (`dtype="bfloat16"`, openpi's) and
int8 weights (the VLM, action expert and SigLIP linear maps and the token
embedding in int8, weight-only): the median of `--repeats` runs after the
compiling one. The floating-point operations are the program's matmuls'
(`flops.program_flops`: the prefix once, the action expert at every step);
the ratio of the achieved FLOP/s to a square
float32 matmul's, timed right before and after it, says how close sampling runs to
the machine's throughput.

Usage:
    python benchmarks/inference.py [--weights float32 bfloat16 int8] [--repeats 5] [--json PATH]
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from flops import efficiency  # noqa: E402
from flops import bracketed  # noqa: E402
from flops import program_flops  # noqa: E402
from pi0_speed import BATCH  # noqa: E402
from pi0_speed import CONFIG  # noqa: E402
from pi0_speed import NUM_STEPS  # noqa: E402
from pi0_speed import machine_info  # noqa: E402
from pi0_speed import make_batch  # noqa: E402
from pi0_speed import timed  # noqa: E402

from keras_openpi.backend import retain_freed_memory  # noqa: E402
from keras_openpi.backend import xla_memory  # noqa: E402
from keras_openpi.finetuning.memory import quantize_layers  # noqa: E402
from keras_openpi.finetuning.summary import dtype_bytes  # noqa: E402
from keras_openpi.models import Pi0  # noqa: E402

WEIGHTS = ("float32", "bfloat16", "int8")


def sampling_model(weights):
    """The small π0 with float32, bfloat16 or int8 (weight-only, bfloat16 elsewhere) weights."""
    model = Pi0(**CONFIG, seed=0, dtype="float32" if weights == "float32" else "bfloat16")
    if weights == "int8":
        quantize_layers(model, [model.vision_encoder, model.gemma], "int8_weight_only")
    return model


def measure(weights, repeats):
    model = sampling_model(weights)
    observation, _ = make_batch(model, np.random.default_rng(0))
    flops = program_flops(*xla_memory.sample_program(model, BATCH, NUM_STEPS))
    times, peak = bracketed(
        lambda: timed(lambda: np.asarray(model.sample_actions(observation, num_steps=NUM_STEPS)), repeats)
    )
    return {
        "weights": weights,
        "weight_bytes": int(sum(np.prod(v.shape) * dtype_bytes(v.dtype) for v in model.weights)),
        "sample_s_median": times["median"],
        "sample_s_all": times["times"],
        "compile_s": times["compile"],
        "matmul": peak,
        **efficiency(flops, times["median"], peak),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--json", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "inference.json"
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be at least 5, got {args.repeats}")
    retain_freed_memory()
    info = machine_info()
    rows = []
    for weights in args.weights:
        row = measure(weights, args.repeats)
        rows.append(row)
        print(
            f"{weights:<9} {row['sample_s_median']:6.3f} s  {row['flops'] / 1e9:8.1f} GFLOP  "
            f"{row['flops_per_s'] / 1e9:7.1f} GFLOP/s  {row['ratio_to_matmul']:.2f} of matmul "
            f"({row['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s)",
            flush=True,
        )
        keras.backend.clear_session()
    results = {
        "config": {**CONFIG, "batch_size": BATCH, "num_steps": NUM_STEPS},
        "rows": rows,
        "machine": info,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
