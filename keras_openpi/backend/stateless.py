"""A layer's call as a pure function of its weights and array arguments (JAX), for `jax.custom_vjp` / `lax.cond`."""

import keras

from keras_openpi.backend.keras_private import current_value


def call_on_arrays(layer, call, args, kwargs):
    """`(forward, inputs, arrays)`: `forward(*inputs)` computes `call(*args, **kwargs)`.

    `inputs` are the current values of `layer.variables` followed by the
    array leaves of `(args, kwargs)` (`arrays`); the other leaves (None,
    Python numbers, flags) are closed over. `forward` reads the layer's
    variables from its weight inputs through a `keras.StatelessScope`, so it
    can be traced again, e.g. in a conditional or a backward pass.
    """
    import jax

    variables = layer.variables
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    arrays = [leaves[i] for i in dynamic]
    inputs = [current_value(v) for v in variables] + arrays

    def forward(*values):
        weights, array_values = values[: len(variables)], values[len(variables) :]
        full = list(leaves)
        for i, array in zip(dynamic, array_values):
            full[i] = array
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, full)
        with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
            return call(*call_args, **call_kwargs)

    return forward, inputs, arrays


def _is_array(leaf):
    import jax
    import numpy as np

    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))
