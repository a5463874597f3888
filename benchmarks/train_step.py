"""Train-step time per fine-tuning strategy, with the FLOP/s achieved against a plain matmul.

The configuration is `pi0_speed.py`'s small π0 (94.9 M parameters, batch 4,
three 224x224 cameras, horizon 50, float32). For each strategy the model is
built, the strategy applied with the memory levers (frozen weights in
bfloat16, LoRA on the activations, remat; `--no-levers` for Keras'
defaults), compiled with AdamW, and `train_on_batch` (the step `fit` runs)
timed: the median of `--repeats` runs after the compiling one. The step's
floating-point operations are its matmuls' (`flops.program_flops`,
recomputation included); the ratio of its
FLOP/s to a square float32 matmul's, timed right before and after it, says how
close the step runs to the machine's throughput.

Usage:
    python benchmarks/train_step.py [--strategies ...] [--no-levers] [--repeats 5] [--json PATH]
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
from memory import STRATEGIES  # noqa: E402
from pi0_speed import BATCH  # noqa: E402
from pi0_speed import CONFIG  # noqa: E402
from pi0_speed import machine_info  # noqa: E402
from pi0_speed import make_batch  # noqa: E402
from pi0_speed import timed  # noqa: E402

from keras_openpi.backend import retain_freed_memory  # noqa: E402
from keras_openpi.backend import xla_memory  # noqa: E402
from keras_openpi.models import Pi0  # noqa: E402

LEVERS = dict(frozen_dtype="bfloat16", remat=True)


def strategy_model(strategy, levers):
    """The small π0 with `strategy` applied, compiled with AdamW."""
    model = Pi0(**CONFIG, seed=0)
    if strategy != "full" or levers.get("remat"):
        options = dict(remat=levers.get("remat", False))
        if strategy != "full" and levers.get("frozen_dtype"):
            options["frozen_dtype"] = levers["frozen_dtype"]
        if strategy == "qlora-int8":
            options["quantize"] = "int8_weight_only"
        model.apply_strategy("lora" if strategy == "qlora-int8" else strategy, **options)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4))
    return model


def measure(strategy, levers, repeats):
    model = strategy_model(strategy, levers)
    observation, actions = make_batch(model, np.random.default_rng(0))
    step, args = xla_memory.train_step_program(model, BATCH)
    flops = program_flops(step, args)
    times, peak = bracketed(lambda: timed(lambda: model.train_on_batch(observation, actions), repeats))
    return {
        "strategy": strategy,
        "levers": levers,
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "step_s_median": times["median"],
        "step_s_all": times["times"],
        "compile_s": times["compile"],
        "matmul": peak,
        **efficiency(flops, times["median"], peak),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-levers", action="store_true", help="Keras' defaults: float32, no remat")
    parser.add_argument(
        "--json", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "train_step.json"
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be at least 5, got {args.repeats}")
    retain_freed_memory()
    levers = {} if args.no_levers else LEVERS
    info = machine_info()
    rows = []
    for strategy in args.strategies:
        row = measure(strategy, levers, args.repeats)
        rows.append(row)
        print(
            f"{strategy:<20} {row['step_s_median']:7.2f} s  {row['flops'] / 1e9:8.1f} GFLOP  "
            f"{row['flops_per_s'] / 1e9:7.1f} GFLOP/s  {row['ratio_to_matmul']:.2f} of matmul "
            f"({row['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s)",
            flush=True,
        )
        keras.backend.clear_session()
    results = {
        "config": {**CONFIG, "batch_size": BATCH, "dtype": "float32"},
        "rows": rows,
        "machine": info,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
