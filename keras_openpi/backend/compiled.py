"""Compiling a model method into one program, on JAX, TensorFlow and PyTorch."""

import contextlib

import keras

from keras_openpi.backend.sequencing import inference_program


class CompiledProgram:
    """Runs `fn(*args, **static)` of a model as a single compiled inference program.

    How it compiles follows the model's own Keras settings (`model.compile(
    jit_compile=..., run_eagerly=...)`, or the `model.jit_compile` and
    `model.run_eagerly` attributes), read at every call:

    - JAX: `jax.jit`, traced once per input signature, with the model's
      variable values passed in (a `keras.StatelessScope`), so the program
      never captures stale weights.
    - TensorFlow: `tf.function`, with XLA (`jit_compile=True`) when
      `model.jit_compile` is true (Keras' default on GPUs and TPUs; on a
      CPU-only machine set `model.jit_compile = True` for XLA), else a plain
      graph.
    - PyTorch: eager under `torch.no_grad()`, or `torch.compile` when
      `model.jit_compile` is true (Keras' default there is false).

    `model.run_eagerly = True` runs the function eagerly on every backend.
    Keyword arguments are static (part of the compilation key). The
    TensorFlow and PyTorch programs read the variables they capture at run
    time; they are rebuilt when the model's variables are replaced (LoRA
    enabled or merged, weights quantized or cast), so they never run stale
    weights either.

    Args:
        model: the `keras.Model` whose variables `fn` reads.
        fn: the function to compile; it must not update variables.

    Example:
    >>> program = CompiledProgram(model, model.flow_matching_loss)  # doctest: +SKIP
    >>> loss = program(observation, actions, noise, time)  # doctest: +SKIP
    """

    def __init__(self, model, fn):
        self.model = model
        self.fn = fn
        self.reset()

    def reset(self):
        """Forgets every compiled program (after a change to how the model's layers compute)."""
        self._jitted = None
        self._program = None
        self._program_key = None
        if keras.backend.backend() == "jax":
            import jax

            self._jitted = jax.jit(self._stateless, static_argnums=(0,))

    def _stateless(self, static, values, args):
        mapping = list(zip(self.model.variables, values))
        with keras.StatelessScope(state_mapping=mapping), inference_program():
            return self.fn(*args, **dict(static))

    def __call__(self, *args, **static):
        if self.model.run_eagerly:
            with _no_grad(), inference_program():
                return self.fn(*args, **static)
        if self._jitted is not None:
            values = [v.value for v in self.model.variables]
            return self._jitted(tuple(sorted(static.items())), values, args)
        with _no_grad():
            return self._captured_program()(*args, **static)

    def _captured_program(self):
        """The TensorFlow / PyTorch program, rebuilt when the variables or `jit_compile` change."""
        jit_compile = bool(self.model.jit_compile)
        key = (jit_compile, tuple(id(v) for v in self.model.variables))
        if key != self._program_key:
            self._program = _compile(self.fn, jit_compile)
            self._program_key = key
        return self._program


def _compile(fn, jit_compile):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile)
    if keras.backend.backend() == "torch" and jit_compile:
        import torch

        return torch.compile(fn)
    return fn


def _no_grad():
    """No autograd recording on PyTorch (the programs are inference only); a no-op elsewhere."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
