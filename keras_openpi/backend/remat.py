"""Rematerializing a layer's call on JAX so that XLA keeps the recomputation, on CPU too."""

import keras


def rematerialized_call(layer, call):
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
        call: the function to rematerialize, usually the layer's bound `call`.

    Returns:
        A function with `call`'s signature.

    Example:
    >>> block.call = rematerialized_call(block, block.call)  # doctest: +SKIP
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"rematerialized_call is for the JAX backend; this is {keras.backend.backend()!r} "
            "(use keras.remat)."
        )

    def remat_call(*args, **kwargs):
        return _checkpointed_call(layer, call, args, kwargs)

    return remat_call


def _is_array(leaf):
    import jax
    import numpy as np

    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _current_value(variable):
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    scope = get_stateless_scope()
    value = scope.get_current_value(variable) if scope is not None else None
    return variable.value if value is None else value


def _checkpointed_call(layer, call, args, kwargs):
    import jax

    variables = layer.variables
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    inputs = [_current_value(v) for v in variables] + [leaves[i] for i in dynamic]

    def forward(*values):
        weights, arrays = values[: len(variables)], values[len(variables) :]
        full = list(leaves)
        for i, array in zip(dynamic, arrays):
            full[i] = array
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, full)
        with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
            return call(*call_args, **call_kwargs)

    return _checkpoint(forward)(*inputs)


def _checkpoint(forward):
    """`forward(*arrays)` under a custom VJP that recomputes it inside a gradient-dependent conditional."""
    import jax
    from jax import numpy as jnp

    perturbed = []

    @jax.custom_vjp
    def run(*values):
        return forward(*values)

    def run_forward(*primals):
        perturbed[:] = [p.perturbed for p in primals]
        values = [p.value for p in primals]
        return forward(*values), values

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
