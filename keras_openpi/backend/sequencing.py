"""Running a layer's call only once its inputs exist, so that XLA cannot prepare its weights early.

XLA's CPU compiler computes bfloat16 and int8 matrix products in float32: it
converts each weight to a float32 temporary. Its default (concurrency
optimized) scheduler then runs every such conversion at the start of the
program, so a full-size π0 holds a float32 copy of all its weights at once
(`sample_actions`, batch 1: 9.7 GiB of temporaries; sequenced, 0.5 GiB). Here a
layer's call runs inside an XLA conditional whose predicate is read from the
layer's first floating input: nothing in it, the weight conversions included,
can be scheduled before that input exists, so at most one layer's converted
weights are alive at a time. Outputs and gradients are those of the call.

Only inference programs are sequenced (inside `inference_program()`, which
`CompiledProgram` enters) and the forward pass of rematerialized layers: in a
differentiated call the conditional would make XLA keep, as its outputs,
every residual it could otherwise fuse away.

JAX only; `layer_sequencing_default()` turns it on where it pays: when JAX's
default device is a CPU (on GPU and TPU, bfloat16 products need no copy, and a
conditional costs a host round trip).
"""

import contextlib
import contextvars

import keras

from keras_openpi.backend.stateless import call_on_arrays

_INFERENCE = contextvars.ContextVar("keras_openpi_inference_program", default=False)


@contextlib.contextmanager
def inference_program():
    """Marks what is traced inside as never differentiated: sequenced layers are sequenced there."""
    token = _INFERENCE.set(True)
    try:
        yield
    finally:
        _INFERENCE.reset(token)


def layer_sequencing_default():
    """Whether layers are sequenced by default: on JAX, when its default device is a CPU."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def sequenced_call(layer, call):
    """`call` (a layer's `call`) run after its first floating input exists (see the module docstring).

    Only calls inside `inference_program()` are sequenced; the others run as they are.

    Args:
        layer: the layer whose variables `call` reads.
        call: the function to sequence, usually the layer's bound `forward` (see `backend.call_levers`).

    Returns:
        A function with `call`'s signature.

    Example:
    >>> run = sequenced_call(block, block.forward)  # doctest: +SKIP
    """
    if keras.backend.backend() != "jax":
        raise ValueError(f"sequenced_call is for the JAX backend; this is {keras.backend.backend()!r}.")

    def run_sequenced(*args, **kwargs):
        if not _INFERENCE.get():
            return call(*args, **kwargs)
        forward, inputs, arrays = call_on_arrays(layer, call, args, kwargs)
        return sequenced_forward(forward, len(inputs) - len(arrays))(*inputs)

    return run_sequenced


def sequenced_forward(forward, num_weights):
    """`forward(*weights, *arrays)` inside a conditional on its first non-empty floating array.

    `forward` and its inputs are `backend.stateless.call_on_arrays`'; the
    first `num_weights` inputs are the layer's weights.
    """
    import jax
    from jax import numpy as jnp

    def run(*values):
        arrays = values[num_weights:]
        floats = [a for a in arrays if jnp.issubdtype(a.dtype, jnp.floating) and a.size]
        if not floats:
            return forward(*values)
        probe = jnp.ravel(floats[0])[0]
        # Always true (NaN takes the same branch), but not before `probe` exists.
        return jax.lax.cond(probe == probe, forward, forward, *values)

    return run
