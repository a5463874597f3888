"""The one module that uses Keras' private API; tests/test_keras_private.py pins every use.

Keras 3.15 offers no public way to do these things, which the memory
levers and the fine-tuning strategies need:

- `current_value`: a variable's value in the enclosing `keras.StatelessScope`
  as mapped, without the autocast `variable.value` applies inside a
  mixed-precision layer call (`keras.src...stateless_scope.get_stateless_scope`);
- `shapes_only`: building a model whose variables are never allocated (Keras'
  global list of variables awaiting initialization, `uninitialized_variables`);
- `replace_variable`: giving a built layer a weight of another dtype under
  the same attribute, name and path (`Layer._tracker`, `Layer._untrack_variable`);
- `flatten_layers`: every layer nested in a layer (`Layer._flatten_layers`);
- `ema_pairs`: an optimizer's EMA copies of the weights
  (`Optimizer._trainable_variables`, `_model_variables_moving_average`);
- `OpenpiEMAMixin`: openpi's EMA start and update, by overriding the
  optimizer's `build` and its `_update_model_variables_moving_average` hook;
- `jitted_train_step`: the jitted JAX train step `fit` runs (the
  `step_function` closed over by `model.train_function`), to lower it.

Everything else in keras_openpi goes through Keras' public API. When a Keras
release moves one of these, its test in tests/test_keras_private.py fails
with the name of what moved.
"""

import contextlib
import contextvars
import inspect

import keras

_SHAPES_ONLY = contextvars.ContextVar("keras_openpi_shapes_only", default=False)


def current_value(variable):
    """The value `variable` has in the enclosing `keras.StatelessScope` (the train step's), else its own.

    Unlike `variable.value`, the scope's value is not autocast: inside a
    mixed-precision layer call a float32 weight stays the float32 value the
    train step differentiates.
    """
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    scope = get_stateless_scope()
    value = scope.get_current_value(variable) if scope is not None else None
    return variable.value if value is None else value


@contextlib.contextmanager
def shapes_only():
    """Builds models without allocating their weights (shapes and dtypes only).

    Inside the block, variables are created by Keras as deferred (a
    `keras.StatelessScope` that does not initialize them); on exit they are
    dropped from Keras' list of variables awaiting initialization, so they are
    never allocated. Such a model can be inspected (`trainable_summary`,
    `count_params`, strategies, LoRA, int8 quantization) but not run.

    Example:
    >>> with shapes_only():
    ...     model = Pi0()  # full size: 3.2B parameters, no memory
    ...     model.enable_lora(rank="openpi")
    >>> model.trainable_summary()["total"]["frozen"]
    2819996672
    """
    from keras.src.backend.common import global_state

    pending = global_state.get_global_attribute(
        "uninitialized_variables", [], set_to_default=True
    )
    start = len(pending)
    token = _SHAPES_ONLY.set(True)
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        _SHAPES_ONLY.reset(token)
        del pending[start:]


def in_shapes_only():
    """True inside `shapes_only()`: weights exist as shapes and dtypes only."""
    return _SHAPES_ONLY.get()


def replace_variable(layer, variable, replacement_fn):
    """Replaces `variable`, a weight `layer` holds as an attribute, by `replacement_fn()`'s.

    `replacement_fn` is called with the layer's state unlocked and must create
    the new weight with `layer.add_weight` (same name, hence same path); the
    old weight is untracked and every attribute that held it now holds the
    new one.

    Returns:
        the new weight.

    Raises:
        ValueError: `layer` holds `variable` under no attribute.
    """
    attributes = [k for k, v in vars(layer).items() if v is variable]
    if not attributes:
        raise ValueError(
            f"Cannot replace {variable.path!r}: {layer.path!r} does not hold it as an attribute."
        )
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        replacement = replacement_fn()
        layer._untrack_variable(variable)
        for attribute in attributes:
            setattr(layer, attribute, replacement)
    finally:
        if locked:
            tracker.lock()
    return replacement


def flatten_layers(layer, include_self=True):
    """Every layer nested in `layer` (depth first, parents before children)."""
    return list(layer._flatten_layers(include_self=include_self))


def ema_pairs(optimizer):
    """`[(weight, average)]`: the EMA copy a built optimizer with `use_ema` keeps of each weight."""
    if not getattr(optimizer, "use_ema", False) or not optimizer.built:
        return []
    pairs = zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)
    return [(variable, average) for variable, average in pairs if average is not None]


class OpenpiEMAMixin:
    """Makes a Keras optimizer's EMA start at the initial weights, as openpi's does.

    Keras optimizers keep an EMA of the trainable weights (`use_ema=True`,
    `ema_momentum`) as optimizer variables, so it is threaded through the
    compiled train step, sharded like its weight, and saved with the
    optimizer state. Keras starts the average at the weights after the first
    update (momentum 0 at step 0); openpi starts it at the initial weights.
    With this mixin the average is set to the weights when the optimizer is
    built and updated after every step as `average = d * average + (1 - d) *
    weight`, `d = ema_momentum`. openpi averages every parameter, frozen ones
    included; frozen weights never change, so averaging the trainable ones is
    the same. Keras' end is kept: at the end of `fit` the model's trainable
    weights are replaced by their average (`finalize_variable_values`), so
    the model `fit` returns holds openpi's inference weights.

    Example:
    >>> class AdamW(OpenpiEMAMixin, keras.optimizers.AdamW): ...  # doctest: +SKIP
    """

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        if self.use_ema:
            for variable, average in zip(variables, self._model_variables_moving_average):
                if average is not None:
                    # A copy: on JAX the average and the weight must not share a buffer
                    # (the train step donates both).
                    average.assign(keras.ops.copy(variable.value))

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        decay = self.ema_momentum
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                average.assign(decay * average + (1.0 - decay) * variable)


def jitted_train_step(model):
    """The jitted JAX train step of `model.fit` (`make_train_function` is called first).

    Raises:
        ValueError: Keras' JAX trainer no longer closes over a jitted `step_function`.
    """
    model.make_train_function(force=True)
    step = inspect.getclosurevars(model.train_function).nonlocals.get("step_function")
    if not hasattr(step, "lower"):
        raise ValueError(
            "Keras' JAX trainer no longer exposes its jitted train step as `step_function` "
            f"(found {type(step).__name__}); keras {keras.__version__} is not supported."
        )
    return step
