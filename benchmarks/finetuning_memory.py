"""Parameter counts and training-state memory of every fine-tuning strategy, full-size π0 / π0.5.

The models are built with `shapes_only()` (no weight is allocated), the
strategy is applied, and `trainable_summary()` gives, per strategy: trainable
and frozen parameters, weight bytes, gradient bytes (one per trainable
weight) and AdamW state (two float32 slots per trainable weight). Each
strategy is shown with frozen weights in float32 and in bfloat16
(`frozen_dtype="bfloat16"`, openpi's setting); the QLoRA row quantizes the
frozen Gemma weights to int8 (`quantize="int8"`), which reads each kernel
once, so it allocates one kernel at a time. Activations are not included:
they depend on batch size, sequence length and rematerialization and are
measured with XLA separately.

Usage:
    python benchmarks/finetuning_memory.py [--json PATH] [--model pi0|pi05]
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_openpi.finetuning import STRATEGIES  # noqa: E402
from keras_openpi.finetuning import shapes_only  # noqa: E402
from keras_openpi.models import Pi0  # noqa: E402

GIB = 2**30


def measure(pi05, strategy, **options):
    with shapes_only():
        model = Pi0(pi05=pi05)
        model.apply_strategy(strategy, **options)
    total = model.trainable_summary()["total"]
    return {
        "strategy": strategy,
        **{k: v for k, v in options.items() if v},
        "trainable": total["trainable"],
        "frozen": total["frozen"],
        "weights_gib": (total["trainable_bytes"] + total["frozen_bytes"]) / GIB,
        "gradients_gib": total["gradient_bytes"] / GIB,
        "adamw_gib": total["optimizer_bytes"] / GIB,
        "training_state_gib": total["training_bytes"] / GIB,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--model", choices=["pi0", "pi05"], default="pi0")
    args = parser.parse_args(argv)
    pi05 = args.model == "pi05"
    rows = []
    for strategy in STRATEGIES:
        for frozen_dtype in ([None] if strategy == "full" else [None, "bfloat16"]):
            rows.append(measure(pi05, strategy, frozen_dtype=frozen_dtype))
    rows.append(measure(pi05, "lora", freeze_vision=True, frozen_dtype="bfloat16"))
    rows.append(measure(pi05, "lora", quantize="int8"))
    header = f"{'strategy':<56}{'trainable':>15}{'frozen':>15}{'weights':>9}{'grads':>8}{'AdamW':>8}{'total GiB':>11}"
    print(f"{args.model}: training state per strategy (activations excluded)")
    print(header)
    for row in rows:
        label = row["strategy"] + "".join(
            f" {k}={row[k]}" for k in ("freeze_vision", "frozen_dtype", "quantize") if k in row
        )
        print(
            f"{label:<56}{row['trainable']:>15,}{row['frozen']:>15,}{row['weights_gib']:>9.2f}"
            f"{row['gradients_gib']:>8.2f}{row['adamw_gib']:>8.2f}{row['training_state_gib']:>11.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
