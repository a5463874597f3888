"""The full-size π0 path on this machine: time and peak memory of each stage.

A random π0 checkpoint in openpi's released layout (the `params/` orbax tree,
openpi's paths and shapes, stored in bfloat16; written one array at a time
by `random_openpi_checkpoint.py`, so it is never held twice) goes through
what a user does with a real one, each stage in a fresh process:

1. `checkpoint`: write the random openpi checkpoint;
2. `convert`: `keras-openpi convert openpi` to a `.keras` file;
3. `load`: check the archive (zip64 records once it passes 4 GiB, every
   member's CRC-32) and load it (`load_keras_policy`);
4. `finetune`: load again, then `lora` (`apply_strategy("lora",
   frozen_dtype="bfloat16", remat=True)`, as the training configs' LoRA;
   without remat the step keeps a float32 copy of every frozen kernel for
   the backward pass), `fit` (one AdamW step at batch 1, compile included)
   and `save` (the fine-tuned `.keras`, then its archive checked);
5. `serve`: `Policy.from_checkpoint` on the fine-tuned file (sampler compiled
   at construction) answering one request.

Each stage records its seconds and peak resident memory. A process's peak
is the kernel's `ru_maxrss` of that child (`os.wait4`) or, where the
process resets its high-water mark, the highest mark it saw; each step
inside a process (load, lora, fit, save, ...) has its own peak: `VmHWM`
reset before the step (`/proc/self/clear_refs`). Results (with CPU seconds,
file sizes, parameter counts and the machine: cores, RAM) go to
`results/full_size.json` and a table is printed. The multi-GB files are
deleted as soon as no later stage reads them, and at the end, unless `--keep`.

Usage:
    python benchmarks/full_size.py [--variant pi0|pi0-2-layers|tiny] [--workdir DIR] [--keep]
        [--params-dtype bfloat16|float32] [--freeze-vision] [--no-remat] [--json PATH]

`pi0` is the released size (3,238,048,528 parameters; about 36 GB of disk
at the peak, 40 GB with `--keep`); `pi0-2-layers` has π0's widths with two
layers per transformer and a vocabulary of 16,384 (325 M parameters, for
per-parameter extrapolation); `tiny` is the test's (about 2.5 CPU minutes,
mostly imports and compiles).
"""

import argparse
import json
import math
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

GIB = 2**30
HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

_VLM_2B, _EXPERT_300M = "gemma_2b", "gemma_300m"
_SO400M = dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14)
_TWO_LAYERS = dict(depth=2)
_GEMMA_2B = dict(
    width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256
)
_GEMMA_300M = dict(_GEMMA_2B, width=1024, mlp_dim=4096)
_TINY_GEMMA = dict(
    width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16
)
# Pi0 arguments per variant; action_horizon and max_token_len go to `convert` as flags.
VARIANTS = {
    "pi0": dict(
        paligemma_variant=_VLM_2B,
        action_expert_variant=_EXPERT_300M,
        vision_variant="So400m/14",
        vocabulary_size=257_152,
        action_dim=32,
        action_horizon=50,
        max_token_len=48,
    ),
    "pi0-2-layers": dict(
        paligemma_variant=dict(_GEMMA_2B, **_TWO_LAYERS),
        action_expert_variant=dict(_GEMMA_300M, **_TWO_LAYERS),
        vision_variant=dict(_SO400M, **_TWO_LAYERS),
        vocabulary_size=16_384,
        action_dim=32,
        action_horizon=50,
        max_token_len=48,
    ),
    "tiny": dict(
        paligemma_variant=_TINY_GEMMA,
        action_expert_variant=dict(_TINY_GEMMA, width=16, mlp_dim=32),
        vision_variant=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16),
        vocabulary_size=259,
        action_dim=8,
        action_horizon=4,
        max_token_len=16,
        image_resolution=(32, 32),
    ),
}
PROMPT = "pick up the cube"


# === measuring ===


def _vm_kib(field):
    match = re.search(
        rf"^{field}:\s+(\d+) kB",
        pathlib.Path("/proc/self/status").read_text(),
        re.MULTILINE,
    )
    return int(match.group(1))


class Steps:
    """Times the steps of one process; each step's peak RSS is its own (VmHWM reset first).

    The reset also lowers what the kernel reports as the process's
    `ru_maxrss`, so the process's peak is kept here: the VmHWM before each
    reset and at the end (`process_peak_gib`).
    """

    def __init__(self):
        self.records = []
        self._peak_kib = 0

    def process_peak_gib(self):
        self._peak_kib = max(self._peak_kib, _vm_kib("VmHWM"))
        return round(self._peak_kib / 2**20, 3)

    def run(self, name, fn, *args, **kwargs):
        self.process_peak_gib()
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        # In the stage's log, so that a stage the kernel kills names its step.
        print(f"step {name!r}: starting at RSS {_vm_kib('VmRSS') / 2**20:.2f} GiB", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.records.append(
            dict(
                stage=name,
                seconds=round(time.perf_counter() - start, 2),
                peak_rss_gib=round(_vm_kib("VmHWM") / 2**20, 3),
                rss_after_gib=round(_vm_kib("VmRSS") / 2**20, 3),
            )
        )
        return result

    def note(self, **fields):
        self.records[-1].update(fields)


def zip_report(path):
    """Size and zip64 structure of a `.keras` archive: a file past 4 GiB must have the zip64 records.

    Raises:
        ValueError: a file past 4 GiB without zip64 end records, or a member
            past 4 GiB (size or offset) without its zip64 extra field.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        handle.seek(max(0, size - (1 << 16)))
        tail = handle.read()
    zip64_end = b"PK\x06\x06" in tail and b"PK\x06\x07" in tail
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    large = [
        m
        for m in members
        if max(m.file_size, m.compress_size, m.header_offset) >= 0xFFFFFFFF
    ]
    without_extra = [m.filename for m in large if b"\x01\x00" not in m.extra[:2]]
    if size >= 2**32 and not zip64_end:
        raise ValueError(
            f"{path} is {size / GIB:.2f} GiB but has no zip64 end records."
        )
    if without_extra:
        raise ValueError(
            f"{path}: members past 4 GiB without a zip64 extra field: {without_extra}."
        )
    return dict(
        file_gib=round(size / GIB, 3),
        zip64=zip64_end,
        members={m.filename: m.file_size for m in members},
    )


# === stages (each in its own process) ===


def stage_checkpoint(args, out):
    sys.path.insert(0, str(HERE))
    from random_openpi_checkpoint import write_random_checkpoint

    config = {k: v for k, v in VARIANTS[args.variant].items() if k != "max_token_len"}
    steps = Steps()
    counts = steps.run(
        "checkpoint", write_random_checkpoint, out["params"], config, args.params_dtype
    )
    steps.note(
        parameters=counts["parameters"],
        arrays=counts["arrays"],
        dtype=args.params_dtype,
        disk_gib=round(_disk_bytes(out["params"]) / GIB, 3),
    )
    return steps


def stage_load(args, out):
    from keras_openpi.convert.keras_file import load_keras_policy

    steps = Steps()
    report = steps.run("zip check", zip_report, out["converted"])
    steps.note(**{k: v for k, v in report.items() if k != "members"})
    model = steps.run("load", load_keras_policy, out["converted"])
    steps.note(parameters=int(model.count_params()), crc_checked=True)
    return steps


def _training_batch(model, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    height, width = model.image_resolution
    length = model.max_token_len
    observation = {
        "image": {
            k: rng.uniform(-1, 1, (1, height, width, 3)).astype("float32")
            for k in model.image_keys
        },
        "image_mask": {k: np.ones((1,), bool) for k in model.image_keys},
        "state": rng.normal(size=(1, model.action_dim)).astype("float32"),
        "tokenized_prompt": rng.integers(0, model.vocabulary_size, (1, length)).astype(
            "int32"
        ),
        "tokenized_prompt_mask": np.ones((1, length), bool),
    }
    actions = rng.normal(size=(1, model.action_horizon, model.action_dim)).astype(
        "float32"
    )
    return observation, actions


def _fit_one_step(model):
    import keras

    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=2.5e-5))
    observation, actions = _training_batch(model)
    history = model.fit(observation, actions, batch_size=1, epochs=1, verbose=0)
    return float(history.history["loss"][-1])


def stage_finetune(args, out):
    from keras_openpi.commands.convert import save_model
    from keras_openpi.convert.keras_file import load_keras_policy

    steps = Steps()
    model = steps.run("load (for fine-tuning)", load_keras_policy, out["converted"])
    steps.run("lora", model.apply_strategy, "lora", frozen_dtype="bfloat16",
              freeze_vision=args.freeze_vision, remat=args.remat)  # fmt: skip
    summary = model.trainable_summary()["total"]
    steps.note(
        rematerialized_layers=sum("remat" in l.call_levers for l in model.remat_layers()),
        trainable_parameters=int(summary["trainable"]),
        frozen_parameters=int(summary["frozen"]),
        weight_gib=round(
            (summary["trainable_bytes"] + summary["frozen_bytes"]) / GIB, 3
        ),
    )
    loss = steps.run("fit (1 step, batch 1)", _fit_one_step, model)
    steps.note(loss=loss)
    if not math.isfinite(loss):
        raise RuntimeError(f"the fine-tuning step gave a non-finite loss ({loss}).")
    steps.run("save", save_model, model, out["finetuned"])
    report = zip_report(out["finetuned"])
    steps.note(**{k: v for k, v in report.items() if k != "members"})
    return steps


def stage_serve(args, out):
    import numpy as np

    from keras_openpi.serving.policy import Policy

    steps = Steps()
    policy = steps.run(
        "serve: load + compile",
        Policy.from_checkpoint,
        out["finetuned"],
        tokenizer="byte",
        seed=0,
    )
    model = policy.model
    height, width = model.image_resolution
    rng = np.random.default_rng(1)
    request = {
        "image": {
            k: rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for k in model.image_keys
        },
        "state": rng.normal(size=(model.action_dim,)).astype(np.float32),
        "prompt": PROMPT,
    }
    response = steps.run("serve: 1 request", policy.infer, request)
    actions = np.asarray(response["actions"])
    steps.note(
        actions_shape=list(actions.shape),
        actions_finite=bool(np.isfinite(actions).all()),
        infer_ms=round(float(response["policy_timing"]["infer_ms"]), 1),
        warmup_seconds=round(float(policy.warmup_seconds), 2),
        parameters=int(model.count_params()),
    )
    return steps


STAGES = {
    "checkpoint": stage_checkpoint,
    "load": stage_load,
    "finetune": stage_finetune,
    "serve": stage_serve,
}


# === driver ===


def _disk_bytes(path):
    path = pathlib.Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _paths(workdir):
    return dict(
        params=str(workdir / "openpi" / "params"),
        converted=str(workdir / "pi0_converted.keras"),
        finetuned=str(workdir / "pi0_lora.keras"),
    )


def _run_child(command, name, log):
    """Runs `command`; returns its seconds and peak RSS (its own `ru_maxrss`, via `wait4`)."""
    start = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO
        )
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = pathlib.Path(log).read_text(errors="replace")[-3000:]
        raise RuntimeError(
            f"stage {name!r} failed (exit {process.returncode}); its output ends:\n{tail}"
        )
    cpu = usage.ru_utime + usage.ru_stime
    return dict(process=name, seconds=round(seconds, 2), cpu_seconds=round(cpu, 2),
                peak_rss_gib=round(usage.ru_maxrss / 2**20, 3))  # fmt: skip


def _remove_outputs(workdir):
    """Deletes the checkpoint and `.keras` files (the logs stay)."""
    shutil.rmtree(workdir / "openpi", ignore_errors=True)
    for name in ("converted", "finetuned"):
        pathlib.Path(_paths(workdir)[name]).unlink(missing_ok=True)


def _stage_command(args, name, result):
    return [
        sys.executable, __file__, "--stage", name, "--stage-json", str(result),
        "--variant", args.variant, "--workdir", str(args.workdir), "--params-dtype", args.params_dtype,
    ] + (["--freeze-vision"] if args.freeze_vision else []) + (
        [] if args.remat else ["--no-remat"])  # fmt: skip


def _convert_command(args, out):
    config = VARIANTS[args.variant]
    return [
        sys.executable, "-m", "keras_openpi", "convert", "openpi", out["params"],
        "--model", "pi0", "--action-horizon", str(config["action_horizon"]),
        "--max-token-len", str(config["max_token_len"]), "--output", out["converted"],
    ]  # fmt: skip


def _machine():
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    import keras

    return dict(
        cores=os.cpu_count(),
        ram_gib=round(pages / GIB, 1),
        cpu=platform.processor() or platform.machine(),
        python=platform.python_version(),
        keras=keras.__version__,
        backend=keras.backend.backend(),
    )


def run_all(args):
    """Runs every stage in its own process; returns the result dict."""
    workdir = args.workdir
    out = _paths(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stages = []

    def child(name, command, result=None):
        record = _run_child(command, name, logs / f"{name}.log")
        steps = [dict(stage=name)]
        if result:  # the kernel's ru_maxrss misses the peaks before a VmHWM reset
            reported = json.loads(result.read_text())
            steps = reported["steps"]
            peak = max(record["peak_rss_gib"], reported["process_peak_rss_gib"])
            record["peak_rss_gib"] = peak
        for step in steps:
            step.setdefault("peak_rss_gib", record["peak_rss_gib"])
            step.setdefault("seconds", record["seconds"])
            stages.append(dict(step, process=name, process_seconds=record["seconds"],
                               process_cpu_seconds=record["cpu_seconds"],
                               process_peak_rss_gib=record["peak_rss_gib"]))  # fmt: skip
        print(f"  {name}: {record['seconds']:.1f} s ({record['cpu_seconds']:.1f} s CPU), "
              f"peak RSS {record['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip

    def in_process(name):
        result = logs / f"{name}.json"
        child(name, _stage_command(args, name, result), result)

    in_process("checkpoint")
    child("convert", _convert_command(args, out))
    converted = stages[-1]
    converted.update(file_gib=round(os.path.getsize(out["converted"]) / GIB, 3))
    log = (logs / "convert.log").read_text()
    match = re.search(r"\(([\d,]+) parameters\)", log)
    converted["parameters"] = int(match.group(1).replace(",", "")) if match else None
    if not args.keep:
        shutil.rmtree(pathlib.Path(out["params"]).parent)
    in_process("load")
    in_process("finetune")
    if not args.keep:
        os.remove(out["converted"])
    in_process("serve")
    return dict(
        variant=args.variant,
        command=" ".join(["python", "benchmarks/full_size.py", *args.argv]),
        config=VARIANTS[args.variant],
        params_dtype=args.params_dtype,
        strategy=dict(name="lora", frozen_dtype="bfloat16", freeze_vision=args.freeze_vision,
                      remat=args.remat),  # fmt: skip
        machine=_machine(),
        stages=stages,
        max_peak_rss_gib=max(s["process_peak_rss_gib"] for s in stages),
    )


def print_table(result):
    print(f"\n{result['variant']} ({result['params_dtype']} checkpoint) on "
          f"{result['machine']['cores']} cores, {result['machine']['ram_gib']} GiB RAM")  # fmt: skip
    print(
        f"{'stage':28s} {'seconds':>9s} {'peak RSS GiB':>13s} {'file GiB':>9s} {'parameters':>15s}"
    )
    for s in result["stages"]:
        size = s.get("file_gib", s.get("disk_gib"))
        params = s.get("parameters") or s.get("trainable_parameters")
        print(
            f"{s['stage']:28s} {s['seconds']:9.1f} {s['peak_rss_gib']:13.2f} "
            f"{'' if size is None else f'{size:.2f}':>9s} {'' if params is None else f'{params:,}':>15s}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="pi0")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="where the multi-GB files go (default: a new temporary folder)")  # fmt: skip
    parser.add_argument(
        "--keep", action="store_true", help="keep the checkpoint and .keras files"
    )
    parser.add_argument("--params-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="stored dtype of the openpi checkpoint (openpi's releases: bfloat16)")  # fmt: skip
    parser.add_argument("--freeze-vision", action="store_true",
                        help="LoRA with the vision tower frozen too (43 M trainable instead of 458 M)")  # fmt: skip
    parser.add_argument("--no-remat", dest="remat", action="store_false",
                        help="LoRA without rematerialization (the training configs' LoRA remats; "
                             "without it the fit step keeps a float32 copy of every frozen "
                             "bfloat16 kernel for the backward pass)")  # fmt: skip
    parser.add_argument("--json", type=pathlib.Path, default=None,
                        help="default: results/full_size.json (pi0), results/full_size_<variant>.json")  # fmt: skip
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--stage-json", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if args.stage:
        import keras_openpi.models

        steps = STAGES[args.stage](args, _paths(args.workdir))
        result = dict(
            steps=steps.records, process_peak_rss_gib=steps.process_peak_gib()
        )
        args.stage_json.write_text(json.dumps(result, indent=1))
        return 0
    made = args.workdir is None
    if made:
        args.workdir = pathlib.Path(tempfile.mkdtemp(prefix="keras_openpi_full_size_"))
    elif args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(
            f"--workdir {args.workdir} is not empty; give a new or empty folder."
        )
    args.workdir = args.workdir.resolve()
    try:
        result = run_all(args)
    finally:
        if not args.keep:
            _remove_outputs(args.workdir)
            if made:
                shutil.rmtree(args.workdir, ignore_errors=True)
    name = (
        "full_size.json" if args.variant == "pi0" else f"full_size_{args.variant}.json"
    )
    path = args.json or RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
