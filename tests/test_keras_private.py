"""Keras' private API, used by `keras_openpi.backend.keras_private` only: each use pinned here.

When a Keras release moves one of these, the test of that use fails and names it.
"""

import pathlib
import re

import keras
import numpy as np
import pytest

from keras_openpi.backend import keras_private

PACKAGE = pathlib.Path(keras_private.__file__).resolve().parents[1]
# Private Keras names keras_openpi once used outside the one module (and must not again).
PRIVATE_NAMES = (
    "keras.src",
    "_tracker",
    "_untrack_variable",
    "_kernel",
    "_get_kernel_with_merged_lora",
    "_update_metrics_variables",
    "_flatten_layers",
    "_trainable_variables",
    "_non_trainable_variables",
    "_model_variables_moving_average",
)


def test_only_one_module_touches_keras_private_api():
    pattern = re.compile("|".join(r"(?<!\w)" + re.escape(name) + r"\b" for name in PRIVATE_NAMES))
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if pattern.search(path.read_text())
    )
    assert users == ["backend/keras_private.py"]


def test_current_value_reads_the_stateless_scope_without_autocast():
    variable = keras.Variable(np.ones((2,), "float32"))
    assert np.asarray(keras_private.current_value(variable)).tolist() == [1.0, 1.0]
    with keras.StatelessScope(state_mapping=[(variable, np.full((2,), 3.0, "float32"))]):
        assert np.asarray(keras_private.current_value(variable)).tolist() == [3.0, 3.0]

    class Probe(keras.layers.Layer):
        def build(self, input_shape):
            self.weight = self.add_weight(shape=(2,), initializer="ones")

        def call(self, x):
            self.seen = (keras_private.current_value(self.weight).dtype, self.weight.value.dtype)
            return x

    probe = Probe(dtype="mixed_bfloat16")
    probe.build((1, 2))
    with keras.StatelessScope(state_mapping=[(probe.weight, np.ones((2,), "float32"))]):
        probe(np.ones((1, 2), "float32"))
    # In a train step's scope, `variable.value` is autocast inside a mixed-precision
    # call; the current value (what the step differentiates) is not.
    assert [keras.backend.standardize_dtype(d) for d in probe.seen] == ["float32", "bfloat16"]


def test_shapes_only_allocates_nothing_and_leaves_no_pending_variables():
    from keras.src.backend.common import global_state

    with keras_private.shapes_only():
        assert keras_private.in_shapes_only()
        layer = keras.layers.Dense(4096)
        layer.build((None, 4096))
    assert not keras_private.in_shapes_only()
    assert layer.kernel._value is None  # deferred, never allocated
    assert global_state.get_global_attribute("uninitialized_variables") == []


def test_replace_variable_keeps_attribute_name_path_and_lock():
    layer = keras.layers.Dense(3, name="dense")
    layer.build((None, 2))
    old = layer.kernel
    path = old.path
    assert layer._tracker.locked
    new = keras_private.replace_variable(
        layer,
        old,
        lambda: layer.add_weight(
            shape=old.shape, initializer="ones", dtype="bfloat16", trainable=False, name="kernel"
        ),
    )
    assert layer._tracker.locked
    assert new.path == path and str(new.dtype) == "bfloat16" and not new.trainable
    assert sorted(v.path for v in layer.weights) == ["dense/bias", "dense/kernel"]
    assert not any(v is old for v in layer.weights) and any(v is new for v in layer.weights)
    assert layer(np.ones((1, 2), "float32")).shape == (1, 3)
    with pytest.raises(ValueError, match="does not hold it as an attribute"):
        keras_private.replace_variable(layer, old, lambda: None)


def test_flatten_layers_lists_nested_layers_parents_first():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="block")
            self.inner = keras.layers.Dense(2, name="inner")

    class Outer(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="outer")
            self.block = Block()
            self.head = keras.layers.Dense(1, name="head")

    outer = Outer()
    names = [layer.name for layer in keras_private.flatten_layers(outer)]
    assert names == ["outer", "block", "inner", "head"]
    assert [layer.name for layer in keras_private.flatten_layers(outer, include_self=False)][0] == "block"


def test_ema_pairs_and_the_jitted_train_step():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(use_ema=True), loss="mse")
    model.optimizer.build(model.trainable_variables)
    pairs = keras_private.ema_pairs(model.optimizer)
    assert [variable.path for variable, _ in pairs] == [v.path for v in model.trainable_variables]
    assert all(tuple(a.shape) == tuple(v.shape) for v, a in pairs)
    assert keras_private.ema_pairs(keras.optimizers.Adam()) == []
    if keras.backend.backend() == "jax":
        assert hasattr(keras_private.jitted_train_step(model), "lower")
