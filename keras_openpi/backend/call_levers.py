"""A layer's computation wrapped by the memory levers: rematerialized, sequenced, in row chunks.

The levers are set per layer by `keras_openpi.finetuning` (`set_remat`,
`set_sequencing`) on layers with `keras_openpi.layers.CallLeversMixin`,
whose `call` runs `levered_call(...)` around the layer's `forward`:

- `remat`: the activations inside the layer are recomputed in the backward
  pass (JAX: `backend.remat.rematerialized_call`, which XLA's CPU compiler
  keeps; other backends: `keras.remat`);
- `sequenced`: the layer runs only once its input exists (JAX; see
  `backend.sequencing`);
- `row_chunked`: a row-wise layer (a feed-forward) runs in rematerialized
  chunks of at most `chunk_rows` rows (JAX; ignored on the other backends).
"""

import keras
from keras import ops

from keras_openpi.backend.remat import rematerialized_call
from keras_openpi.backend.remat import row_chunked_call
from keras_openpi.backend.sequencing import sequenced_call

LEVERS = ("remat", "sequenced", "row_chunked")


def check_levers(levers):
    """Raises a clear error for unknown levers or a lever this backend cannot apply."""
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise ValueError(f"Unknown call levers {unknown}; expected some of {list(LEVERS)}.")
    if "sequenced" in levers and keras.backend.backend() != "jax":
        raise ValueError(
            f"Layer sequencing is for the JAX backend; this is {keras.backend.backend()!r}."
        )


def levered_call(layer, forward, levers, chunk_rows=None):
    """`forward` (the layer's computation) wrapped by `levers`; a function with its signature.

    Args:
        layer: the layer whose variables `forward` reads.
        forward: the layer's computation, e.g. its bound `forward` method.
        levers: a set of names in `LEVERS`.
        chunk_rows: the most rows of one chunk for `row_chunked` (None: one piece).
    """
    jax = keras.backend.backend() == "jax"
    call = forward
    sequenced = "sequenced" in levers
    if "remat" in levers and jax:
        # Sequenced forward only: a conditional inside the differentiated
        # recomputation would make XLA keep every residual it could fuse away.
        call = rematerialized_call(layer, call, sequenced=sequenced)
    elif "remat" in levers:
        call = _rematerialized(call)
    elif sequenced:
        call = sequenced_call(layer, call)
    if "row_chunked" in levers and jax and chunk_rows is not None:
        call = row_chunked_call(layer, call, chunk_rows)
    return call


def _rematerialized(call):
    def remat_call(*args, **kwargs):
        # A new function at every call: JAX caches a checkpointed trace per
        # function, and `call` reads the layer's weights by closure (traced
        # values that differ from one trace or step to the next). The float
        # tensors among the arguments go in as positional inputs, the rest
        # (None, ints, masks) by closure: TensorFlow's graph-mode
        # `custom_gradient` takes no keywords, no None and no bool inputs.
        structure = (args, kwargs)
        leaves = keras.tree.flatten(structure)
        where = [i for i, leaf in enumerate(leaves) if _is_float_tensor(leaf)]

        def on_tensors(*tensors):
            rebuilt = list(leaves)
            for i, tensor in zip(where, tensors):
                rebuilt[i] = tensor
            call_args, call_kwargs = keras.tree.pack_sequence_as(structure, rebuilt)
            return call(*call_args, **call_kwargs)

        return keras.remat(on_tensors)(*(leaves[i] for i in where))

    return remat_call


def _is_float_tensor(x):
    return ops.is_tensor(x) and keras.backend.is_float_dtype(x.dtype)
