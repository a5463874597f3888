"""What a model's compiled programs hold in memory, from XLA's own analysis, without allocating weights.

The programs are the ones the model runs: the train step `fit` runs (Keras'
jitted JAX `train_step` over its state: trainable, non-trainable, optimizer
and metrics variables, with the state donated) and π0's `sample_actions`
program (`CompiledProgram`). They are lowered from abstract values
(`jax.ShapeDtypeStruct`s of every variable and input) and compiled for the
default device; `memory_analysis()` then gives the bytes of the arguments,
outputs, temporaries and of the outputs aliased to donated arguments. A model
built inside `keras_openpi.finetuning.shapes_only()` works: no weight is
allocated, so a 3.3 B-parameter π0 can be planned on a laptop.

JAX only.
"""

import math
import time

import keras

from keras_openpi.backend.keras_private import ema_pairs
from keras_openpi.backend.keras_private import jitted_train_step
from keras_openpi.backend.keras_private import shapes_only

COMPILED_FIELDS = {
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
}


def spec(variable_or_shape, dtype=None):
    """A `jax.ShapeDtypeStruct` for a variable (or a shape and dtype), in JAX's canonical dtype.

    Example:
    >>> spec((2, 3), "int64")  # int32 unless jax_enable_x64
    ShapeDtypeStruct(shape=(2, 3), dtype=int32)
    """
    import jax

    if dtype is None:
        shape, dtype = variable_or_shape.shape, variable_or_shape.dtype
    else:
        shape = variable_or_shape
    dtype = jax.dtypes.canonicalize_dtype(keras.backend.standardize_dtype(dtype))
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def spec_bytes(tree):
    """Total bytes of the arrays a pytree of `ShapeDtypeStruct`s describes."""
    import jax

    return sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree_util.tree_leaves(tree))


def observation_specs(model, batch_size):
    """`(observation, actions)` specs of a training batch, as `fit` gets it (float32 images)."""
    height, width = model.image_resolution
    observation = {
        "image": {k: spec((batch_size, height, width, 3), "float32") for k in model.image_keys},
        "image_mask": {k: spec((batch_size,), "bool") for k in model.image_keys},
        "state": spec((batch_size, model.action_dim), "float32"),
        "tokenized_prompt": spec((batch_size, model.max_token_len), "int32"),
        "tokenized_prompt_mask": spec((batch_size, model.max_token_len), "bool"),
    }
    actions = spec((batch_size, model.action_horizon, model.action_dim), "float32")
    return observation, actions


def train_step_program(model, batch_size):
    """The jitted train step of `model.fit` and its abstract arguments `(state, data)`.

    `model` must be compiled (`model.compile(optimizer=...)`). An optimizer
    that is not built yet is built here without allocating its slots (inside
    `shapes_only`), for the model's trainable variables.
    """
    if getattr(model, "optimizer", None) is None:
        raise ValueError(f"Compile {model.name!r} with an optimizer before measuring its train step.")
    if not model.optimizer.built:
        with shapes_only():
            model.optimizer.build(model.trainable_variables)
    step = jitted_train_step(model)
    state = tuple(
        [spec(v) for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    return step, (state, observation_specs(model, batch_size))


def sample_program(model, batch_size, num_steps=10):
    """π0's jitted `sample_actions` program and its abstract arguments."""
    import jax

    program = model._sample_program
    if getattr(program, "_jitted", None) is None:
        raise ValueError("The sampling program is compiled with jax.jit on the JAX backend only.")
    observation, actions = observation_specs(model, batch_size)
    prepared = jax.eval_shape(model.prepare_observation, observation)
    values = [spec(v) for v in model.variables]
    static = (("num_steps", int(num_steps)),)
    return program._jitted, (static, values, (prepared, actions))


def compiled_memory(jitted, args):
    """Lowers and compiles `jitted(*args)`; returns XLA's memory analysis as a dict.

    `total_bytes` is arguments + outputs + temporaries - aliased (outputs
    written into donated arguments): what the program needs at its peak
    under XLA's buffer assignment.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    record = {key: int(getattr(analysis, field)) for key, field in COMPILED_FIELDS.items()}
    record["total_bytes"] = (
        record["argument_bytes"] + record["output_bytes"] + record["temp_bytes"] - record["alias_bytes"]
    )
    record["compile_seconds"] = round(seconds, 1)
    return record, compiled


def analytical_training_bytes(model):
    """Weights, gradients, optimizer slots, EMA and other state bytes, counted from the variables.

    Weights, gradients and optimizer slots are `trainable_summary()`'s
    (one gradient per trainable weight; the optimizer's slots per trainable
    weight); `ema_bytes` is the optimizer's EMA copy of the trainable
    weights; `other_state_bytes` the rest of the train step's state (step
    counter, metrics, noise generator).
    """
    summary = model.trainable_summary()["total"]
    optimizer = model.optimizer
    weight_ids = {id(v) for v in model.weights}
    averages = [average for _, average in ema_pairs(optimizer)]
    average_ids = {id(v) for v in averages}
    slot_bytes = sum(
        spec_bytes(spec(v)) for v in optimizer.variables if v.shape and id(v) not in average_ids
    )
    state = [*model.trainable_variables, *model.non_trainable_variables, *model.metrics_variables]
    other = [v for v in state if id(v) not in weight_ids]
    other += [v for v in optimizer.variables if not v.shape]
    return {
        "weights_bytes": summary["trainable_bytes"] + summary["frozen_bytes"],
        "gradient_bytes": summary["gradient_bytes"],
        "optimizer_bytes": slot_bytes,
        "ema_bytes": sum(spec_bytes(spec(v)) for v in averages),
        "other_state_bytes": sum(spec_bytes(spec(v)) for v in other),
        "trainable_params": summary["trainable"],
        "frozen_params": summary["frozen"],
    }


def train_step_memory(model, batch_size):
    """XLA's memory analysis of `model`'s train step for a batch, with the analytical bytes beside it.

    Args:
        model: a compiled π0 / π0.5 (e.g. built in `shapes_only()`, strategy
            applied, `model.compile(optimizer=AdamW(...))`).
        batch_size: the global batch size.

    Returns:
        A dict: `argument_bytes`, `output_bytes`, `temp_bytes`,
        `alias_bytes`, `total_bytes`, `generated_code_bytes`,
        `compile_seconds`, `input_bytes` (the batch), the analytical
        `weights_bytes`, `gradient_bytes`, `optimizer_bytes`, `ema_bytes`,
        `other_state_bytes`, parameter counts, and `argument_mismatch_bytes`:
        XLA's argument bytes minus the analytical state and batch bytes (0
        when the two agree).

    Example:
    >>> with shapes_only():
    ...     model = Pi0()
    ...     model.apply_strategy("lora", frozen_dtype="bfloat16", remat=True)
    >>> model.compile(optimizer=AdamW())
    >>> train_step_memory(model, 32)["total_bytes"] / 2**30  # doctest: +SKIP
    """
    step, args = train_step_program(model, batch_size)
    record, _ = compiled_memory(step, args)
    record["input_bytes"] = spec_bytes(args[1])
    record.update(analytical_training_bytes(model))
    analytical = sum(
        record[k] for k in ("weights_bytes", "optimizer_bytes", "ema_bytes", "other_state_bytes", "input_bytes")
    )
    record["argument_mismatch_bytes"] = record["argument_bytes"] - analytical
    return record


def sample_memory(model, batch_size, num_steps=10):
    """XLA's memory analysis of `model.sample_actions` for a batch (see `train_step_memory`).

    Returns:
        A dict with XLA's fields, `input_bytes` (observation and noise),
        `weights_bytes` (every variable of the model) and
        `argument_mismatch_bytes` (XLA's arguments minus weights and inputs).
    """
    jitted, args = sample_program(model, batch_size, num_steps)
    record, _ = compiled_memory(jitted, args)
    record["input_bytes"] = spec_bytes(args[2])
    record["weights_bytes"] = spec_bytes(args[1])
    record["argument_mismatch_bytes"] = (
        record["argument_bytes"] - record["weights_bytes"] - record["input_bytes"]
    )
    return record


def peak_bytes(jitted, args, static_argnums=()):
    """Runs the program once on the default device on zero-filled arguments; the allocator's peak.

    For accelerators (GPU, TPU), whose allocator reports `peak_bytes_in_use`
    (CPU does not: None). Allocates every argument.
    """
    import jax
    from jax import numpy as jnp

    device = jax.local_devices()[0]
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    values = [
        arg if i in static_argnums else jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), arg)
        for i, arg in enumerate(args)
    ]
    jax.block_until_ready(jitted(*values))
    return int(device.memory_stats()["peak_bytes_in_use"])
