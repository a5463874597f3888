"""Memory levers: frozen weights in bfloat16, int8 frozen bases (QLoRA), rematerialization."""

import contextlib
import gc

import keras
from keras import ops

from keras_openpi.backend.keras_private import flatten_layers
from keras_openpi.backend.keras_private import in_shapes_only
from keras_openpi.backend.keras_private import replace_variable
from keras_openpi.finetuning.groups import owning_layers
from keras_openpi.layers.call_levers import CallLeversMixin

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
    targets = [
        v
        for v in model.weights
        if not v.trainable
        and keras.backend.is_float_dtype(v.dtype)
        and keras.backend.standardize_dtype(v.dtype) != dtype
        and not getattr(owners[id(v)], "quantization_mode", None)
    ]
    count = len(targets)
    # Popped one at a time, so that each old weight is freed once replaced: the peak is
    # the model plus one weight, not the model in both dtypes.
    while targets:
        variable = targets.pop()
        layer = owners[id(variable)]

        def cast_copy(layer=layer, variable=variable):
            # Initialized from the old value (deferred, like the old one, inside `shapes_only`).
            return layer.add_weight(
                shape=variable.shape,
                initializer=lambda shape, dtype: ops.cast(variable.value, dtype),
                dtype=dtype,
                trainable=False,
                name=variable.name,
            )

        replace_variable(layer, variable, cast_copy)
    return count


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
        for sub in flatten_layers(layer)
        if isinstance(sub, QUANTIZABLE)
    }
    if ids:
        quantize_fast(model, mode, config, lambda layer: id(layer) in ids)


def quantize_fast(model, mode, config, filters):
    """`model.quantize`, without its cost of one full garbage collection per layer.

    Inside `shapes_only()` (weights never allocated) the int8 values are not
    computed either: each layer is quantized with a weight quantizer that
    gives zeros and unit scales of the right shapes (`ShapesOnlyQuantizer`),
    then keeps `config` as its quantization config.
    """
    with frozen_heap():
        if not in_shapes_only():
            model.quantize(mode, config=config, filters=filters)
            return
        if mode != "int8":
            raise ValueError(f"Only int8 quantization works inside shapes_only(), got {mode!r}.")
        layers = [
            layer for layer in flatten_layers(model, include_self=False)
            if isinstance(layer, QUANTIZABLE) and filters(layer)
        ]
        for layer in layers:
            shapes_only_config = keras.quantizers.Int8QuantizationConfig(
                weight_quantizer=ShapesOnlyQuantizer(axis=kernel_reduced_axes(layer)),
                activation_quantizer=_activation_quantizer(config),
            )
            model.quantize(mode, config=shapes_only_config, filters=lambda l, layer=layer: l is layer)
            layer.quantization_config = config


def _activation_quantizer(config):
    if config is None:  # Keras' default int8: activations per token
        return keras.quantizers.AbsMaxQuantizer(axis=-1)
    return config.activation_quantizer


def kernel_reduced_axes(layer):
    """The kernel axes Keras' int8 quantization takes each scale over (`AbsMaxQuantizer`'s axis).

    Dense: the input axis 0; Embedding: the width axis -1; EinsumDense: the
    kernel axes absent from the output. A tied `ReversibleEmbedding` only.
    """
    if isinstance(layer, keras.layers.ReversibleEmbedding) and not layer.tie_weights:
        raise ValueError(
            f"{layer.path!r}: an untied ReversibleEmbedding cannot be quantized inside shapes_only()."
        )
    if isinstance(layer, keras.layers.Embedding):
        return (-1,)
    if isinstance(layer, keras.layers.EinsumDense):
        kernel, output = layer.equation.split(",")[1].split("->")
        return tuple(i for i, label in enumerate(kernel) if label not in output)
    return (0,)


class ShapesOnlyQuantizer(keras.quantizers.AbsMaxQuantizer):
    """Abs-max quantization's outputs as shapes and dtypes only: zeros and unit scales.

    For weights that were never allocated (`shapes_only()`): nothing is read
    or computed, and the layer gets int8 weights and scales of the shapes and
    dtypes Keras' `AbsMaxQuantizer` would give.
    """

    def __call__(self, x, axis=None, to_numpy=False):
        axis = self.axis if axis is None else axis
        shape = tuple(x.shape)
        axes = {a % len(shape) for a in (axis if isinstance(axis, (list, tuple)) else [axis])}
        scale_shape = tuple(1 if i in axes else n for i, n in enumerate(shape))
        scale_dtype = keras.backend.standardize_dtype(x.dtype)
        return ops.zeros(shape, self.output_dtype), ops.ones(scale_shape, scale_dtype)


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
    """Rematerializes each of `model.remat_layers()` in training.

    The activations inside a rematerialized layer are recomputed in the
    backward pass instead of being kept: memory per layer drops to its inputs,
    for about one more forward pass of compute. On JAX the model's
    `row_chunked_layers()` (feed-forwards) are also computed in chunks of at
    most `feed_forward_rows` rows, each rematerialized on its own
    (`backend.remat.row_chunked_call`; None: in one piece). Outputs and
    gradients are unchanged.
    """
    _set_lever(model.remat_layers(), "remat", enabled)
    row_chunked = model.row_chunked_layers() if hasattr(model, "row_chunked_layers") else []
    _set_lever(row_chunked, "row_chunked", enabled and feed_forward_rows is not None, feed_forward_rows)


def set_sequencing(model, enabled=True):
    """Runs each of `model.remat_layers()` only once its input exists (JAX; see `backend.sequencing`).

    On CPU, XLA would otherwise convert every bfloat16 / int8 weight to a
    float32 temporary at the start of the program. Outputs are unchanged.
    """
    _set_lever(model.remat_layers(), "sequenced", enabled)


def _set_lever(layers, lever, enabled, chunk_rows=None):
    for layer in layers:
        if not isinstance(layer, CallLeversMixin):
            raise ValueError(
                f"{layer.path!r} is a {type(layer).__name__}, which takes no memory levers: "
                "remat_layers() and row_chunked_layers() must be keras_openpi.layers.CallLeversMixin layers."
            )
        levers = layer.call_levers | {lever} if enabled else layer.call_levers - {lever}
        layer.set_call_levers(levers, chunk_rows if chunk_rows is not None else layer.chunk_rows)
