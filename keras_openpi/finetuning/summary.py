"""What a fine-tuning strategy trains and what training will hold in memory."""

import math
import re

import keras

from keras_openpi.finetuning.groups import group_weights

COLUMNS = ("trainable", "frozen", "trainable_bytes", "frozen_bytes", "optimizer_bytes")


def dtype_bytes(dtype):
    """Bytes per element: `float32` -> 4, `bfloat16` -> 2, `int8` -> 1, `bool` -> 1."""
    dtype = keras.backend.standardize_dtype(dtype)
    bits = re.search(r"(\d+)$", dtype)
    return max(1, int(bits.group(1)) // 8) if bits else 1


class TrainableSummary(dict):
    """Per-group parameter counts and bytes, as a dict; `str()` gives the table.

    Keys are the model's groups (for π0: `vision`, `vlm`, `action_expert`,
    `projections`), `lora_adapters` and `total`; each maps to a dict with
    `trainable`, `frozen` (parameter counts), `trainable_bytes`,
    `frozen_bytes` and `optimizer_bytes` (the optimizer slots training will
    allocate for the trainable weights). `total` also has `gradient_bytes`
    (one gradient per trainable weight) and `training_bytes` (weights,
    gradients and optimizer state; activations not included).
    """

    def __init__(self, rows, title):
        super().__init__(rows)
        self.title = title

    def __str__(self):
        header = f"{'group':<16}{'trainable':>16}{'frozen':>16}{'trainable MB':>14}{'frozen MB':>12}{'optimizer MB':>14}"
        lines = [self.title, header, "-" * len(header)]
        for group, row in self.items():
            if group == "total":
                lines.append("-" * len(header))
            lines.append(
                f"{group:<16}{row['trainable']:>16,}{row['frozen']:>16,}"
                f"{row['trainable_bytes'] / 2**20:>14,.1f}{row['frozen_bytes'] / 2**20:>12,.1f}"
                f"{row['optimizer_bytes'] / 2**20:>14,.1f}"
            )
        total = self["total"]
        lines.append(
            f"training state: weights {(total['trainable_bytes'] + total['frozen_bytes']) / 2**30:,.2f} GiB"
            f" + gradients {total['gradient_bytes'] / 2**30:,.2f} GiB"
            f" + optimizer {total['optimizer_bytes'] / 2**30:,.2f} GiB"
            f" = {total['training_bytes'] / 2**30:,.2f} GiB (activations not included)"
        )
        return "\n".join(lines)

    __repr__ = __str__


def trainable_summary(model, optimizer_slots=2, title=None):
    """Counts the model's weights per group, trainable vs frozen, with bytes.

    Args:
        model: a model declaring `finetuning_groups()`.
        optimizer_slots: optimizer variables per trainable weight (AdamW,
            Adam: 2, the first and second moments; SGD with momentum: 1). Keras
            creates them in the weight's dtype and only for trainable weights.
        title: first line of the table.

    Returns:
        a `TrainableSummary`.
    """
    rows = {}
    for group, weights in group_weights(model).items():
        row = dict.fromkeys(COLUMNS, 0)
        for variable in weights:
            count = math.prod(variable.shape)
            size = count * dtype_bytes(variable.dtype)
            kind = "trainable" if variable.trainable else "frozen"
            row[kind] += count
            row[f"{kind}_bytes"] += size
        row["optimizer_bytes"] = optimizer_slots * row["trainable_bytes"]
        if any(row.values()) or group != "other":
            rows[group] = row
    total = {column: sum(row[column] for row in rows.values()) for column in COLUMNS}
    total["gradient_bytes"] = total["trainable_bytes"]
    total["training_bytes"] = (
        total["trainable_bytes"] + total["frozen_bytes"] + total["gradient_bytes"] + total["optimizer_bytes"]
    )
    rows["total"] = total
    return TrainableSummary(rows, title or f"Trainable summary of {model.name!r}")
