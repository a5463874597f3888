"""keras_openpi: openpi's π0 / π0.5 / π0-FAST policies as Keras 3 models.

JAX is the primary backend: it is selected unless `KERAS_BACKEND` says otherwise.
`keras_openpi.Pi0`, `Pi0Fast` and `Policy` are imported on first use, so that
`import keras_openpi` (and the `keras-openpi` command line) starts without
importing Keras; importing `keras_openpi.models` (or using one of them)
registers the model classes that `keras.saving.load_model` needs.
"""

import importlib
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

__version__ = "0.1.0"
# Public name: the module that defines it.
_EXPORTS = {
    "Pi0": "keras_openpi.models",
    "Pi0Fast": "keras_openpi.models",
    "Policy": "keras_openpi.serving",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keras_openpi' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
