"""Memory levers: frozen weights in bfloat16, int8 frozen bases (QLoRA), rematerialization."""

import contextlib
import gc

import keras
from keras import ops

from keras_openpi.backend.remat import rematerialized_call
from keras_openpi.backend.remat import row_chunked_call
from keras_openpi.backend.sequencing import sequenced_call
from keras_openpi.finetuning.groups import owning_layers

QUANTIZABLE = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)


def cast_frozen(model, dtype="bfloat16"):
    """Stores every frozen float weight in `dtype`; trainable weights and adapters are untouched.

    openpi keeps its frozen weights in bfloat16 and its trained ones in float32
    (`init_train_state`); this does the same to a Keras model: each frozen
    weight is replaced, in the layer that owns it, by a non-trainable variable
    of the same name and path holding the cast value. Weights of quantized
    layers are left as they are. Returns the number of weights cast.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    if not keras.backend.is_float_dtype(dtype):
        raise ValueError(f"Frozen weights can be cast to a float dtype, got {dtype!r}.")
    owners = owning_layers(model)
    targets = {
        id(v): v
        for v in model.weights
        if not v.trainable
        and keras.backend.is_float_dtype(v.dtype)
        and keras.backend.standardize_dtype(v.dtype) != dtype
        and not getattr(owners[id(v)], "quantization_mode", None)
    }
    for variable in targets.values():
        layer = owners[id(variable)]
        attributes = [k for k, v in vars(layer).items() if v is variable]
        if not attributes:
            raise ValueError(
                f"Cannot cast {variable.path!r}: {layer.path!r} does not hold it as an attribute."
            )
        _replace_variable(layer, attributes, variable, dtype)
    return len(targets)


def _replace_variable(layer, attributes, variable, dtype):
    locked = layer._tracker.locked
    layer._tracker.unlock()
    # Initialized from the old value (deferred, like the old one, inside `shapes_only`).
    replacement = layer.add_weight(
        shape=variable.shape,
        initializer=lambda shape, dtype: ops.cast(variable.value, dtype),
        dtype=dtype,
        trainable=False,
        name=variable.name,
    )
    layer._untrack_variable(variable)
    for attribute in attributes:
        setattr(layer, attribute, replacement)
    if locked:
        layer._tracker.lock()


def quantization_mode(quantize):
    """`(mode, config)` for `Model.quantize` from a strategy's `quantize` option.

    `"int8"` is Keras' default int8 (weights per output channel, and the
    activations quantized per token at every call); `"int8_weight_only"`
    keeps activations in float (QLoRA's choice); a
    `keras.quantizers.QuantizationConfig` is used as given.
    """
    if isinstance(quantize, keras.quantizers.QuantizationConfig):
        return quantize.mode, quantize
    if quantize == "int8":
        return "int8", None
    if quantize == "int8_weight_only":
        return "int8", keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    raise ValueError(
        f"quantize must be 'int8', 'int8_weight_only' or a keras.quantizers.QuantizationConfig, "
        f"got {quantize!r}."
    )


def quantize_layers(model, layers, quantize="int8"):
    """Quantizes the Dense / EinsumDense / Embedding layers among `layers` (and their sub-layers).

    Keras stores their kernels in int8 (non-trainable) with float scales and
    gives gradients to the inputs only; quantize before `enable_lora`.

    Args:
        model: the model holding `layers`.
        layers: the layers to quantize, with their sub-layers.
        quantize: see `quantization_mode`.
    """
    mode, config = quantization_mode(quantize)
    ids = {
        id(sub)
        for layer in layers
        for sub in layer._flatten_layers(include_self=True)
        if isinstance(sub, QUANTIZABLE)
    }
    if ids:
        quantize_fast(model, mode, config, lambda layer: id(layer) in ids)


def quantize_fast(model, mode, config, filters):
    """`model.quantize`, without its cost of one full garbage collection per layer.

    Inside `shapes_only()` (weights never allocated) the int8 values are not
    computed either: only their shapes and dtypes exist, as for every weight.
    """
    with frozen_heap(), _shapes_only_quantization():
        model.quantize(mode, config=config, filters=filters)


@contextlib.contextmanager
def _shapes_only_quantization():
    """In `shapes_only()`, Keras' abs-max quantizer returns zeros of the right shapes, uncomputed."""
    from keras.src.backend.common.stateless_scope import get_stateless_scope
    from keras.src.quantizers import quantizers

    scope = get_stateless_scope()
    if scope is None or scope.initialize_variables:
        yield
        return
    computed = quantizers.abs_max_quantize

    def shapes_only_abs_max_quantize(inputs, axis, value_range=(-127, 127), dtype="int8", *_, **__):
        shape = tuple(inputs.shape)
        axes = [a % len(shape) for a in (axis if isinstance(axis, (list, tuple)) else [axis])]
        scale_shape = tuple(1 if i in axes else n for i, n in enumerate(shape))
        scale_dtype = keras.backend.standardize_dtype(inputs.dtype)
        return ops.zeros(shape, dtype), ops.ones(scale_shape, scale_dtype)

    quantizers.abs_max_quantize = shapes_only_abs_max_quantize
    try:
        yield
    finally:
        quantizers.abs_max_quantize = computed


@contextlib.contextmanager
def frozen_heap():
    """Makes `gc.collect()` cheap inside the block by exempting the objects alive at its start.

    Keras runs a full collection for every variable it deletes (`quantize`
    replaces each kernel): about 0.2 s each once TensorFlow is imported, minutes
    for a full-size model. The exempted objects are handed back on exit.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# Rows (batch x tokens) of one feed-forward chunk under remat (`row_chunked_call`):
# 4096 x 16384 float32 is 256 MiB per Gemma 2B MLP tensor.
FEED_FORWARD_CHUNK_ROWS = 4096


def set_remat(model, enabled=True, feed_forward_rows=FEED_FORWARD_CHUNK_ROWS):
    """Rematerializes (`keras.remat`) each of `model.remat_layers()` in training.

    The activations inside a rematerialized layer are recomputed in the
    backward pass instead of being kept: memory per layer drops to its inputs,
    for about one more forward pass of compute. On JAX the model's
    `row_chunked_layers()` (feed-forwards) are also computed in chunks of at
    most `feed_forward_rows` rows, each rematerialized on its own
    (`backend.remat.row_chunked_call`; None: in one piece). Outputs and
    gradients are unchanged.
    """
    _set_call_lever(model, "remat", enabled)
    if keras.backend.backend() == "jax" and hasattr(model, "row_chunked_layers"):
        layers = model.row_chunked_layers()
        for layer in layers:
            object.__setattr__(layer, "_chunk_rows", feed_forward_rows)
        chunked = enabled and feed_forward_rows is not None
        _set_call_lever(model, "row_chunked", chunked, layers)


def set_sequencing(model, enabled=True):
    """Runs each of `model.remat_layers()` only once its input exists (JAX; see `backend.sequencing`).

    On CPU, XLA would otherwise convert every bfloat16 / int8 weight to a
    float32 temporary at the start of the program. Outputs are unchanged.
    """
    if enabled and keras.backend.backend() != "jax":
        raise ValueError(
            f"Layer sequencing is for the JAX backend; this is {keras.backend.backend()!r}."
        )
    _set_call_lever(model, "sequenced", enabled)


def _set_call_lever(model, lever, enabled, layers=None):
    if layers is None:
        if not hasattr(model, "remat_layers"):
            raise ValueError(f"{type(model).__name__} declares no `remat_layers()`.")
        layers = model.remat_layers()
    for layer in layers:
        levers = set(vars(layer).get("_call_levers", ()))
        levers = levers | {lever} if enabled else levers - {lever}
        object.__setattr__(layer, "_call_levers", frozenset(levers))
        _install_call(layer, levers)


def _install_call(layer, levers):
    """Sets `layer.call` to its class's call wrapped by the levers (`remat`, `sequenced`, `row_chunked`)."""
    if "call" in vars(layer):
        del layer.call
    call = layer.call
    sequenced = "sequenced" in levers
    if "remat" in levers and keras.backend.backend() == "jax":
        # Sequenced forward only: a conditional inside the differentiated
        # recomputation would make XLA keep every residual it could fuse away.
        call = rematerialized_call(layer, call, sequenced=sequenced)
    elif "remat" in levers:
        call = _rematerialized(call)
    elif sequenced:
        call = sequenced_call(layer, call)
    if "row_chunked" in levers:
        call = row_chunked_call(layer, call, vars(layer)["_chunk_rows"])
    if levers:
        layer.call = call


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
