"""Memory of full-size π0 / π0.5 training and sampling, per fine-tuning strategy, from XLA's own analysis.

Every program is the one the model runs: the train step `fit` runs (Keras'
jitted JAX step: loss, gradients, AdamW update; its state donated) and the
jitted `sample_actions` program (10 Euler steps). The models are built with
`shapes_only()` (no weight is allocated); each program is lowered from
abstract shapes, compiled for the default device, and XLA's
`memory_analysis()` gives its arguments, outputs, temporaries and aliased
bytes; `total = arguments + outputs + temporaries - aliased`. Beside it, the
weights, gradients, optimizer slots and EMA are counted from the variables,
and `argument_mismatch_bytes` checks that XLA's arguments are exactly those
(plus the batch). On a GPU / TPU, `--peak` also runs each program once on
zero-filled arguments and records the allocator's peak.

Configurations (`setting`): `levers` is the default of each strategy: frozen
weights in bfloat16, LoRA computed on the activations (no merged kernel),
decoder and SigLIP blocks rematerialized (`remat=True`) with their forward
pass sequenced, feed-forwards in rematerialized chunks of at most 4096 rows,
state donated. `--ablation` adds, for π0 `lora` and `full`, the cumulative
steps from Keras' defaults (frozen float32, merged LoRA kernel, no remat) to
the levers, and the levers with bfloat16 compute (`dtype="mixed_bfloat16"`, as
openpi computes), and for sampling at batch 1 the program without layer
sequencing. The `qlora-int8` strategy is `lora` on int8 frozen bases (int8
weights, float activations). Sampling is measured with bfloat16 weights
(`dtype="bfloat16"`, openpi's) and with int8 weights (the VLM, action expert
and SigLIP linear maps and the token embedding in int8, weight-only).

Usage:
    python benchmarks/memory.py [--models pi0 pi05] [--strategies ...] [--batches 1 8 32]
        [--programs train sample] [--weights bfloat16 int8] [--ablation] [--json PATH] [--resume] [--peak]
    python benchmarks/memory.py --report-only   # table and plot from the JSON

Each record is written to the JSON as soon as it is measured; `--resume`
skips the configurations the JSON already holds. The markdown table
(`memory.md`) and bar chart (`memory.png`) are written next to the JSON.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402

from keras_openpi.backend import xla_memory  # noqa: E402
from keras_openpi.finetuning import shapes_only  # noqa: E402
from keras_openpi.finetuning.lora import adapted_layers  # noqa: E402
from keras_openpi.finetuning.memory import quantize_layers  # noqa: E402
from keras_openpi.finetuning.memory import set_remat  # noqa: E402
from keras_openpi.models import Pi0  # noqa: E402

GIB = 2**30
RESULTS = pathlib.Path(__file__).parent / "results"
MODELS = {"pi0": dict(pi05=False), "pi05": dict(pi05=True)}
STRATEGIES = (
    "full",
    "lora",
    "lora_vlm",
    "lora_action_expert",
    "action_expert_only",
    "frozen_vision",
    "qlora-int8",
)
LEVERS = dict(
    frozen_dtype="bfloat16",
    low_rank_lora=True,
    remat=True,
    feed_forward_chunks=True,
    sequencing=True,
    dtype=None,
)
NO_LEVERS = dict(
    LEVERS, frozen_dtype=None, low_rank_lora=False, remat=False, feed_forward_chunks=False, sequencing=False
)
BLOCK_REMAT = dict(LEVERS, feed_forward_chunks=False, sequencing=False)
# `--ablation`, per strategy: the cumulative steps from Keras' defaults to the
# levers, and the levers with bfloat16 compute (openpi's `dtype="bfloat16"`).
ABLATION = {
    "lora": [
        ("keras defaults", NO_LEVERS),
        ("+ bf16 frozen", dict(NO_LEVERS, frozen_dtype="bfloat16")),
        ("+ low-rank LoRA call", dict(NO_LEVERS, frozen_dtype="bfloat16", low_rank_lora=True)),
        ("+ block remat", BLOCK_REMAT),
        ("levers, merged LoRA kernel", dict(LEVERS, low_rank_lora=False)),
        ("levers + bf16 compute", dict(LEVERS, dtype="mixed_bfloat16")),
        ("levers + bf16 compute, merged LoRA kernel", dict(LEVERS, dtype="mixed_bfloat16", low_rank_lora=False)),
    ],
    "full": [
        ("keras defaults", NO_LEVERS),
        ("+ block remat", BLOCK_REMAT),
        ("levers + bf16 compute", dict(LEVERS, dtype="mixed_bfloat16")),
    ],
}
SAMPLE_WEIGHTS = ("bfloat16", "int8")
UNSEQUENCED = "{}, layers not sequenced"
NUM_STEPS = 10
# openpi's own programs for the same full-size π0, compiled the same way on
# CPU XLA with jax 0.5.3 (issue 7): (program, strategy, batch) -> bytes.
OPENPI = {
    ("train", "lora", 32): dict(argument_bytes=11.3e9, temp_bytes=47.7e9, total_bytes=54.9 * GIB),
    ("train", "full", 32): dict(argument_bytes=38.9e9, temp_bytes=44.4e9, total_bytes=77.6 * GIB),
    ("sample", "bfloat16", 1): dict(argument_bytes=6.5e9, temp_bytes=11.2e9, total_bytes=16.4 * GIB),
}
GOALS = {
    ("train", "lora", 32): 27 * GIB,
    ("train", "full", 32): 70 * GIB,
    ("sample", "int8", 1): 8 * GIB,
}
KEY_FIELDS = ("model", "program", "strategy", "weights", "batch", "setting")


def build_train_model(model_name, strategy, levers):
    """A full-size model (no weights allocated) with the strategy applied, compiled with AdamW."""
    quantize = strategy == "qlora-int8"
    with shapes_only():
        model = Pi0(**MODELS[model_name], dtype=levers["dtype"])
        options = dict(remat=levers["remat"])
        if strategy != "full":
            options["frozen_dtype"] = levers["frozen_dtype"]
        if quantize:
            options["quantize"] = "int8_weight_only"
        model.apply_strategy("lora" if quantize else strategy, **options)
    if not levers["low_rank_lora"]:
        for layer in adapted_layers(model):
            layer.low_rank_call = False  # Keras' merged-kernel call
    if levers["remat"] and not levers["feed_forward_chunks"]:
        set_remat(model, True, feed_forward_rows=None)
    model.enable_sequencing(levers["sequencing"])
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=2.5e-5))
    return model


def build_sample_model(model_name, weights, sequencing=True):
    """A full-size model (no weights allocated) in bfloat16, with int8 linear maps for `weights="int8"`."""
    with shapes_only():
        model = Pi0(**MODELS[model_name], dtype="bfloat16")
        if weights == "int8":
            quantize_layers(model, [model.vision_encoder, model.gemma], "int8_weight_only")
    model.enable_sequencing(sequencing)
    return model


def measure(model_name, program, strategy, batch, setting, levers, weights=None):
    """One record: the configuration, XLA's memory analysis and the analytical bytes."""
    start = time.perf_counter()
    if program == "train":
        model = build_train_model(model_name, strategy, levers)
        analysis = xla_memory.train_step_memory(model, batch)
    else:
        model = build_sample_model(model_name, weights, sequencing=setting == weights)
        analysis = xla_memory.sample_memory(model, batch, NUM_STEPS)
    record = {
        "model": model_name,
        "program": program,
        "strategy": strategy,
        "weights": weights,
        "batch": batch,
        "setting": setting,
        "levers": levers if program == "train" else None,
        "num_steps": NUM_STEPS if program == "sample" else None,
        "max_token_len": model.max_token_len,
        "optimizer": "AdamW" if program == "train" else None,
        **analysis,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return record


def configurations(args):
    """`(model, program, strategy, batch, setting, levers, weights)` of every requested record."""
    for model_name in args.models:
        if "sample" in args.programs:
            for weights in args.weights:
                for batch in args.batches:
                    yield model_name, "sample", "inference", batch, weights, None, weights
                    if args.ablation and model_name == "pi0" and batch == 1:
                        yield model_name, "sample", "inference", batch, UNSEQUENCED.format(weights), None, weights
        if "train" not in args.programs:
            continue
        for strategy in args.strategies:
            for batch in args.batches:
                yield model_name, "train", strategy, batch, "levers", LEVERS, None
                if args.ablation and model_name == "pi0":
                    for setting, levers in ABLATION.get(strategy, []):
                        yield model_name, "train", strategy, batch, setting, levers, None


def record_key(record):
    return tuple(record.get(k) for k in KEY_FIELDS)


def machine_info():
    import jax

    return {
        "jax": jax.__version__,
        "keras": keras.__version__,
        "devices": [str(d) for d in jax.devices()],
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "note": "openpi's figures: its own programs compiled the same way on CPU XLA with jax 0.5.3",
    }


def load(path):
    if path.exists():
        return json.loads(path.read_text())
    return {"machine": None, "records": []}


def save(path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def gib(value):
    return "" if value is None else f"{value / GIB:.1f}"


def openpi_figure(record):
    key = (record["program"], record["weights"] or record["strategy"], record["batch"])
    if record["model"] != "pi0" or record["setting"] not in ("levers", "bfloat16"):
        return None
    return OPENPI.get(key)


def goal(record):
    key = (record["program"], record["weights"] or record["strategy"], record["batch"])
    if record["model"] != "pi0" or record["setting"] not in ("levers", "int8"):
        return None
    return GOALS.get(key)


def markdown_table(results):
    """The records as a markdown table (GiB), openpi's figures and the goals beside ours."""
    lines = [
        "| model | program | strategy / weights | batch | setting | arguments | outputs | temporaries "
        "| aliased | **total** | weights | grads | AdamW | EMA | openpi total | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["records"], key=_order):
        theirs, target = openpi_figure(r), goal(r)
        verdict = ""
        if target is not None:
            verdict = f"<= {gib(target)} {'met' if r['total_bytes'] <= target else 'NOT met'}"
        train = r["program"] == "train"
        lines.append(
            f"| {r['model']} | {r['program']} | {r['strategy'] if train else r['weights']} | {r['batch']} "
            f"| {r['setting']} | {gib(r['argument_bytes'])} | {gib(r['output_bytes'])} "
            f"| {gib(r['temp_bytes'])} | {gib(r['alias_bytes'])} | **{gib(r['total_bytes'])}** "
            f"| {gib(r['weights_bytes'])} | {gib(r.get('gradient_bytes')) if train else ''} "
            f"| {gib(r.get('optimizer_bytes')) if train else ''} "
            f"| {gib(r.get('ema_bytes')) if train else ''} "
            f"| {gib(theirs['total_bytes']) if theirs else ''} | {verdict} |"
        )
    machine = results.get("machine") or {}
    train = [abs(r["argument_mismatch_bytes"]) for r in results["records"] if r["program"] == "train"]
    sample = [-r["argument_mismatch_bytes"] for r in results["records"] if r["program"] == "sample"]
    lines += [
        "",
        f"GiB (2^30 bytes) from XLA's compiled memory analysis on {', '.join(machine.get('devices', []))} "
        f"(jax {machine.get('jax')}, keras {machine.get('keras')}); total = arguments + outputs + "
        "temporaries - aliased. openpi's totals: its own programs compiled the same way with jax 0.5.3. "
        "Weights / grads / AdamW / EMA are counted from the variables. Largest difference, "
        f"train arguments minus (weights + AdamW + EMA + step state + batch): {max(train, default=0)} B "
        "(inputs the step never reads are not arguments: π0.5's continuous state, 4 KiB at batch 32); "
        f"sample arguments minus (weights + batch): down to -{max(sample, default=0) / 2**20:.1f} MiB "
        "(weights the sampler never reads, such as the VLM's last output layers, are not arguments). "
        "`levers`: frozen weights bf16, LoRA on the activations, decoder and SigLIP blocks rematerialized "
        "with their forward pass sequenced, feed-forwards in rematerialized chunks of <= 4096 rows; "
        "`+ block remat`: the blocks rematerialized, nothing else. AdamW, no EMA. Sampling: 10 Euler "
        "steps, bf16 or int8 weights, decoder and SigLIP blocks sequenced (`not sequenced`: XLA's CPU "
        "scheduler converts every weight to a float32 temporary up front).",
    ]
    return "\n".join(lines) + "\n"


def _order(record):
    return (
        record["model"],
        record["program"] != "train",
        STRATEGIES.index(record["strategy"]) if record["strategy"] in STRATEGIES else 0,
        record["batch"],
        [setting for setting, _ in ABLATION.get(record["strategy"], [])].index(record["setting"])
        if record["setting"] in dict(ABLATION.get(record["strategy"], []))
        else -1,
    )


def bar_chart(results, path):
    """A horizontal bar chart of the totals at the largest measured batch (openpi's and the goals marked)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    records = sorted(results["records"], key=_order)
    rows = []
    for r in records:
        label = f"{r['model']} {r['program']} {r['strategy'] if r['program'] == 'train' else r['weights']}"
        label += f" b{r['batch']}" + ("" if r["setting"] in ("levers", "bfloat16", "int8") else f" ({r['setting']})")
        rows.append((label, r))
    figure, axis = pyplot.subplots(figsize=(10, 0.32 * len(rows) + 1.5))
    y = range(len(rows))
    parts = (("argument_bytes", "arguments"), ("temp_bytes", "temporaries"), ("output_bytes", "outputs - aliased"))
    left = [0.0] * len(rows)
    for field, name in parts:
        widths = [
            (r[field] - (r["alias_bytes"] if field == "output_bytes" else 0)) / GIB for _, r in rows
        ]
        axis.barh(list(y), widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    for i, (_, r) in enumerate(rows):
        theirs, target = openpi_figure(r), goal(r)
        if theirs:
            axis.plot(theirs["total_bytes"] / GIB, i, "k|", markersize=14, mew=2)
        if target:
            axis.plot(target / GIB, i, "r|", markersize=14, mew=2)
    axis.plot([], [], "k|", mew=2, label="openpi (same measurement)")
    axis.plot([], [], "r|", mew=2, label="goal")
    axis.set_yticks(list(y), [label for label, _ in rows], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("GiB (XLA compiled memory analysis)")
    axis.set_title("Full-size π0 / π0.5: memory per program")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def write_reports(results, json_path):
    """Writes `memory.md` and `memory.png` next to the JSON; returns their paths."""
    markdown = json_path.with_suffix(".md")
    markdown.write_text(markdown_table(results))
    plot = json_path.with_suffix(".png")
    bar_chart(results, plot)
    return markdown, plot


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["pi0", "pi05"])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--programs", nargs="+", choices=["train", "sample"], default=["train", "sample"])
    parser.add_argument("--weights", nargs="+", choices=SAMPLE_WEIGHTS, default=list(SAMPLE_WEIGHTS))
    parser.add_argument("--ablation", action="store_true", help="add the lever steps for π0 lora / full")
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS / "memory.json")
    parser.add_argument("--resume", action="store_true", help="skip configurations already in the JSON")
    parser.add_argument("--peak", action="store_true", help="also run each program once (accelerators)")
    parser.add_argument("--report-only", action="store_true", help="only write the table and plot")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches must be positive, got {args.batches}")
    return args


def main(argv=None):
    args = parse_args(argv)
    results = load(args.json) if (args.resume or args.report_only) else {"machine": None, "records": []}
    if not args.report_only:
        results["machine"] = machine_info()
        done = {record_key(r) for r in results["records"]}
        for model_name, program, strategy, batch, setting, levers, weights in configurations(args):
            key = (model_name, program, strategy, weights, batch, setting)
            if key in done:
                continue
            print(f"{model_name} {program} {strategy} {weights or ''} batch {batch} {setting} ...", flush=True)
            record = measure(model_name, program, strategy, batch, setting, levers, weights)
            if args.peak:
                record["peak_bytes"] = _peak(model_name, program, strategy, batch, levers, weights)
            print(
                f"  total {gib(record['total_bytes'])} GiB (arguments {gib(record['argument_bytes'])}, "
                f"temporaries {gib(record['temp_bytes'])}, mismatch {record['argument_mismatch_bytes']} B) "
                f"in {record['seconds']} s",
                flush=True,
            )
            results["records"] = [r for r in results["records"] if record_key(r) != key] + [record]
            save(args.json, results)
            keras.backend.clear_session()
    markdown, plot = write_reports(results, args.json)
    print(markdown.read_text())
    print(f"wrote {args.json}, {markdown}, {plot}")
    return 0


def _peak(model_name, program, strategy, batch, levers, weights):
    """The allocator's peak for one run of the program (None on CPU)."""
    if program == "train":
        model = build_train_model(model_name, strategy, levers)
        step, args = xla_memory.train_step_program(model, batch)
        return xla_memory.peak_bytes(step, args)
    model = build_sample_model(model_name, weights)
    jitted, args = xla_memory.sample_program(model, batch, NUM_STEPS)
    return xla_memory.peak_bytes(jitted, args, static_argnums=(0,))


if __name__ == "__main__":
    sys.exit(main())
