"""Rematerializing a layer's call on JAX so that XLA keeps the recomputation, on CPU too."""

import keras

from keras_openpi.backend.sequencing import sequenced_forward
from keras_openpi.backend.stateless import call_on_arrays


def rematerialized_call(layer, call, sequenced=False):
    """`call` (a layer's `call`) with its inner activations recomputed in the backward pass.

    On JAX, `jax.checkpoint` (Keras' `keras.remat`) marks the recomputation
    with an optimization barrier that XLA's CPU compiler removes before
    common-subexpression elimination: the recomputed forward is merged with
    the original one and every activation is kept, so a full-size π0 training
    step holds hundreds of GiB of temporaries with or without it. Here the
    layer's forward is instead recomputed inside the backward pass, in an XLA
    conditional whose predicate depends on the incoming gradient: XLA cannot
    merge it with the forward nor schedule it before that gradient exists, on
    any device. Only the layer's inputs (and its weights, which are kept
    anyway) are saved. Gradients are those of `call`. The layer's variables
    are read from the enclosing `keras.StatelessScope` (the train step's), as
    `call` would; `call` must not update variables.

    JAX only (on the other backends `keras.remat` recomputes as asked).

    Args:
        layer: the layer whose variables `call` reads.
        call: the function to rematerialize, usually the layer's bound `forward` (see `backend.call_levers`).
        sequenced: run the forward pass (not the recomputation, which is
            sequenced by its gradient already) after the layer's input exists
            (`backend.sequencing.sequenced_forward`).

    Returns:
        A function with `call`'s signature.

    Example:
    >>> run = rematerialized_call(block, block.forward)  # doctest: +SKIP
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"rematerialized_call is for the JAX backend; this is {keras.backend.backend()!r} "
            "(use keras.remat)."
        )

    def remat_call(*args, **kwargs):
        forward, inputs, arrays = call_on_arrays(layer, call, args, kwargs)
        primal = sequenced_forward(forward, len(inputs) - len(arrays)) if sequenced else None
        return _checkpoint(forward, primal)(*inputs)

    return remat_call


def _checkpoint(forward, primal=None):
    """`forward(*arrays)` under a custom VJP that recomputes it inside a gradient-dependent conditional.

    `primal` (same function, e.g. sequenced) computes the forward pass when given.
    """
    import jax
    from jax import numpy as jnp

    perturbed = []
    primal = primal or forward

    @jax.custom_vjp
    def run(*values):
        return primal(*values)

    def run_forward(*primals):
        perturbed[:] = [p.perturbed for p in primals]
        values = [p.value for p in primals]
        return primal(*values), values

    def run_backward(values, cotangents):
        flat, out_tree = jax.tree_util.tree_flatten(
            cotangents, is_leaf=lambda c: isinstance(c, jax.custom_derivatives.SymbolicZero)
        )
        present = [c for c in flat if not isinstance(c, jax.custom_derivatives.SymbolicZero)]
        if not present or not any(perturbed):
            return tuple(None for _ in values)
        flat = [
            jnp.zeros(c.shape, c.dtype) if isinstance(c, jax.custom_derivatives.SymbolicZero) else c
            for c in flat
        ]
        cotangents = jax.tree_util.tree_unflatten(out_tree, flat)
        differentiated = [i for i, p in enumerate(perturbed) if p]

        def recompute_and_differentiate(operands):
            values, cotangents = operands

            def partial_forward(*diff_values):
                full = list(values)
                for i, v in zip(differentiated, diff_values):
                    full[i] = v
                return forward(*full)

            _, vjp = jax.vjp(partial_forward, *[values[i] for i in differentiated])
            return vjp(cotangents)

        # Always true, but XLA can neither prove it nor evaluate it before the
        # gradient reaching this layer exists (NaN takes the same branch).
        probe = jnp.ravel(present[0])[0]
        grads = jax.lax.cond(
            probe == probe,
            recompute_and_differentiate,
            recompute_and_differentiate,
            (list(values), cotangents),
        )
        result = [None] * len(values)
        for i, grad in zip(differentiated, grads):
            result[i] = grad
        return tuple(result)

    run.defvjp(run_forward, run_backward, symbolic_zeros=True)
    return run


def row_chunked_call(layer, call, max_rows):
    """`call` (a row-wise layer's `call`, e.g. a feed-forward) over chunks of at most `max_rows` rows.

    The first argument `x` of shape `(batch, tokens, ...)` is cut along the
    token axis into the fewest equal chunks of at most `max_rows`
    `batch * tokens` rows (the last padded), which a `lax.scan` computes one
    after another, each rematerialized (`jax.checkpoint`: the backward scan
    recomputes one chunk at a time, so XLA can neither merge the two nor run
    chunks side by side). Inside a rematerialized decoder block this bounds
    what the backward pass of its feed-forward holds at once: a full-size π0
    at batch 32 has 26112 prefix rows, 16384 float32 wide in Gemma's MLP
    (1.6 GiB per tensor, about ten of them alive). Outputs and gradients are
    those of `call` (rows never mix); the feed-forward's forward pass runs
    once more. JAX only.

    Args:
        layer: the layer whose variables `call` reads.
        call: its call; row `i` of its output depends on row `i` of `x` only.
        max_rows: the most rows one chunk holds.
    """
    if keras.backend.backend() != "jax":
        raise ValueError(f"row_chunked_call is for the JAX backend; this is {keras.backend.backend()!r}.")

    def chunked_call(x, *args, **kwargs):
        import jax
        from jax import numpy as jnp

        batch, tokens = x.shape[0], x.shape[1]
        chunks = min(tokens, -(-batch * tokens // max_rows))
        if chunks <= 1:
            return call(x, *args, **kwargs)
        size = -(-tokens // chunks)
        forward, inputs, arrays = call_on_arrays(layer, call, (x, *args), kwargs)
        weights, others = inputs[: len(inputs) - len(arrays)], arrays[1:]
        padded = jnp.pad(x, [(0, 0), (0, size * chunks - tokens)] + [(0, 0)] * (x.ndim - 2))
        xs = jnp.moveaxis(padded.reshape(batch, chunks, size, *x.shape[2:]), 1, 0)
        chunk = jax.checkpoint(lambda w, o, piece: forward(*w, piece, *o))
        _, ys = jax.lax.scan(lambda carry, piece: (carry, chunk(weights, others, piece)), None, xs)
        ys = jnp.moveaxis(ys, 0, 1)
        return ys.reshape(batch, chunks * size, *ys.shape[3:])[:, :tokens]

    return chunked_call
