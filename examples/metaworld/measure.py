"""What each fine-tuning strategy costs: trainable parameters, the train step's compiled memory, time per step.

Runs with keras_openpi (`.venv`). For each strategy the fine-tuning model is built as
`keras-openpi train` builds it (the base policy's architecture from its `.keras` file, the
strategy applied, the config's AdamW), the train step `fit` runs is lowered and compiled for
this machine's CPU (`keras_openpi.backend.xla_memory`: XLA's own memory analysis, as
`benchmarks/memory.py`), and the compiled program is run on a batch of the config's shape:
the median of `--repeats` steps is the time per step (no data loading, no first-step compile).
The steps run between two timings of a plain float32 matmul (`benchmarks/flops.py`): the step's
matmul FLOP/s as a fraction of the matmul's (`ratio_to_matmul`) says how fast it runs whatever
the machine and its load, beside the absolute time.

    python measure.py --base BASE/export/policy.keras --config pi0_metaworld_small_finetune \
        --strategy full '{"name": "full"}' --strategy lora-r4 '{"name": "lora", "rank": 4}' \
        --output costs.json
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_openpi.backend import xla_memory  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
from flops import bracketed  # noqa: E402
from flops import efficiency  # noqa: E402
from flops import program_flops  # noqa: E402
from keras_openpi.training import get_config  # noqa: E402
from keras_openpi.training.optimizer import make_optimizer  # noqa: E402
from keras_openpi.convert.keras_file import read_keras_spec  # noqa: E402


def strategy_model(base, config, strategy):
    """The base's architecture (random weights: costs do not depend on them) with `strategy`."""
    spec = read_keras_spec(base)
    spec["config"].update(seed=config.seed, augment=config.augment)
    model = keras.saving.deserialize_keras_object(spec)
    model.apply_strategy(strategy)
    model.compile(optimizer=make_optimizer(config), jit_compile=True)
    model.optimizer.build(model.trainable_variables)
    return model


def concrete(tree, seed=0):
    """Arrays for a pytree of `ShapeDtypeStruct`s: small random values (bools True)."""
    import jax

    rng = np.random.default_rng(seed)

    def make(s):
        if s.dtype == np.bool_:
            return np.ones(s.shape, bool)
        if np.issubdtype(s.dtype, np.integer):
            return rng.integers(0, 200, s.shape).astype(s.dtype)
        return rng.uniform(-1, 1, s.shape).astype(s.dtype)

    return jax.tree_util.tree_map(make, tree)


def measure(base, config, strategy, repeats):
    """One record: parameters, XLA's memory analysis of the train step, its time per step."""
    import jax

    model = strategy_model(base, config, strategy)
    step, (state_specs, data_specs) = xla_memory.train_step_program(model, config.batch_size)
    record, compiled = xla_memory.compiled_memory(step, (state_specs, data_specs))
    record["input_bytes"] = xla_memory.spec_bytes(data_specs)
    record.update(xla_memory.analytical_training_bytes(model))
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    data = concrete(data_specs)
    times, cpu_times = [], []

    def steps():
        nonlocal state
        for _ in range(repeats + 1):
            start, cpu = time.perf_counter(), time.process_time()
            _, state = compiled(state, data)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu)

    _, matmul = bracketed(steps)
    summary = model.trainable_summary()
    step_seconds = statistics.median(times[1:])
    rate = efficiency(program_flops(step, (state_specs, data_specs)), step_seconds, matmul)
    record.update(
        total_params=int(summary["total"]["trainable"] + summary["total"]["frozen"]),
        step_seconds=round(step_seconds, 4),
        step_flops=rate["flops"],
        ratio_to_matmul=round(rate["ratio_to_matmul"], 4),
        matmul_flops_per_s=round(matmul["flops_per_s"]),
        step_seconds_all=[round(t, 4) for t in times],
        # CPU time (all threads): what the step costs on a machine shared with other jobs.
        step_cpu_seconds=round(statistics.median(cpu_times[1:]), 4),
        batch_size=config.batch_size,
    )
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the base policy's .keras file")
    parser.add_argument("--config", default="pi0_metaworld_small_finetune")
    parser.add_argument(
        "--strategy", nargs=2, action="append", required=True, metavar=("LABEL", "JSON"),
        help="a strategy to measure: its label and its strategy dict (keras-openpi train's)",
    )
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--output", required=True, help="JSON file for the records")
    args = parser.parse_args(argv)
    config = get_config(args.config)
    if args.batch_size:
        config = config.__class__(**{**config.__dict__, "batch_size": args.batch_size})
    if not pathlib.Path(args.base).is_file():
        parser.error(f"--base {args.base} does not exist")
    records = {}
    for label, text in args.strategy:
        try:
            strategy = json.loads(text)
        except json.JSONDecodeError as error:
            parser.error(f"--strategy {label}: not JSON ({error}): {text!r}")
        start = time.time()
        record = measure(args.base, config, strategy, args.repeats)
        record["strategy"] = strategy
        records[label] = record
        print(
            f"{label}: {record['trainable_params']:,} trainable of {record['total_params']:,}; "
            f"train step {record['total_bytes'] / 2**20:.1f} MiB (XLA), "
            f"{record['step_seconds'] * 1000:.0f} ms/step ({record['step_cpu_seconds'] * 1000:.0f} "
            f"ms of CPU, {record['ratio_to_matmul']:.2f} of the matmul's FLOP/s) at batch "
            f"{config.batch_size} "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )
        pathlib.Path(args.output).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
