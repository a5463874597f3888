"""Reading `.keras` policy files with every check: archive, class, checksums, weights.

`keras.saving.load_model` alone lets three kinds of damage through or hides
them: a truncated file fails as "File is not a zip file" without naming it,
a `.keras` of another model loads as that model, and a weights member whose
checksum fails is read anyway (Keras falls back to reading the archive on
the fly when its full read fails). Here each is a one-line `ValueError`
naming the file, and the loaded weights are checked finite.

    model = load_keras_policy("runs/aloha/export/policy.keras")
    spec = read_keras_spec("policy.keras")      # class and arguments, no weights
"""

import json
import os
import zipfile
import zlib

import keras
import numpy as np

from keras_openpi.convert.openpi_params import MAX_ABS_WEIGHT
from keras_openpi.convert.openpi_params import check_weight

CONFIG_MEMBER = "config.json"
# The registered names of the policies this project writes.
POLICY_CLASSES = ("Pi0", "Pi0Fast")
_CHUNK = 1 << 24


def _registered_name(spec):
    name = spec.get("registered_name")
    if name:
        return name
    return f"{spec.get('module', '?')}.{spec.get('class_name', '?')}"


def read_keras_spec(path, expected_classes=POLICY_CLASSES):
    """The model config (class and arguments) stored in a `.keras` file, without loading weights.

    Args:
        path: the `.keras` file.
        expected_classes: keras_openpi class names the file may hold (None: any class).

    Returns:
        the `config.json` dict: `class_name`, `config`, `registered_name`, ...

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a readable `.keras` archive, or a model of another class.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no .keras file at {path}.")
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a .keras file: it is not a zip archive (truncated, or another "
            "format); expected a model saved with model.save(...)."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            if CONFIG_MEMBER not in archive.namelist():
                raise ValueError(
                    f"{path} is not a .keras file: the archive has no {CONFIG_MEMBER} "
                    f"(it holds {sorted(archive.namelist())[:5]})."
                )
            spec = json.loads(archive.read(CONFIG_MEMBER))
    except (zipfile.BadZipFile, zlib.error, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged: cannot read its {CONFIG_MEMBER} ({error}).") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is damaged: its {CONFIG_MEMBER} is not JSON ({error}).") from None
    if not isinstance(spec, dict) or "class_name" not in spec:
        raise ValueError(f"{path}: {CONFIG_MEMBER} holds no Keras object config.")
    if expected_classes is not None:
        expected = [f"keras_openpi>{name}" for name in expected_classes]
        if spec.get("registered_name") not in expected:
            raise ValueError(
                f"{path} holds a {_registered_name(spec)}, not a keras_openpi policy; "
                f"expected {' or '.join(expected)}."
            )
    return spec


def verify_keras_checksums(path):
    """Reads every member of the `.keras` archive once, checking its CRC-32.

    Costs one sequential read of the file; catches damage that Keras itself
    would read through.

    Raises:
        ValueError: a member whose bytes do not match its checksum.
    """
    path = os.fspath(path)
    member = None
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    while stream.read(_CHUNK):
                        pass
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
        where = "" if member is None else f" ({member})"
        raise ValueError(
            f"{path} is damaged{where}: {error}; the file changed after it was written."
        ) from None


def check_model_weights(model, source):
    """Raises a `ValueError` naming the first weight of `model` that is non-finite or huge.

    Two reductions per weight on its own device (no copy to the host); the
    offending index is only searched for when a weight fails.
    """
    for variable in model.weights:
        if not keras.backend.is_float_dtype(variable.dtype):
            continue
        value = variable.value
        finite = bool(keras.ops.convert_to_numpy(keras.ops.all(keras.ops.isfinite(value))))
        peak = float(keras.ops.convert_to_numpy(keras.ops.max(keras.ops.abs(value))))
        if not finite or peak > MAX_ABS_WEIGHT:
            array = np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float32)
            check_weight(variable.path, array, source)


def _load_error(path, error):
    text = str(error).strip().splitlines()
    reason = text[0] if text else type(error).__name__
    return ValueError(f"cannot load {path}: {type(error).__name__}: {reason[:300]}")


def load_keras_policy(path, expected_classes=POLICY_CLASSES):
    """Loads a `.keras` policy after checking the file, and checks its weights.

    Args:
        path: the `.keras` file.
        expected_classes: keras_openpi class names the file may hold.

    Returns:
        the model.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: a damaged file, a model of another class, or a weight
            with NaN, inf or an impossible magnitude (named).
    """
    read_keras_spec(path, expected_classes)
    verify_keras_checksums(path)
    try:
        model = keras.saving.load_model(path)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise _load_error(path, error) from None
    check_model_weights(model, path)
    return model


def load_keras_weights(model, path, expected_classes=POLICY_CLASSES):
    """Loads the weights of a `.keras` file into `model` after the same checks.

    Raises:
        ValueError: as `load_keras_policy`; the weights that were loaded
            before a failure stay in `model`, so discard it then.
    """
    read_keras_spec(path, expected_classes)
    verify_keras_checksums(path)
    try:
        model.load_weights(path)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise _load_error(path, error) from None
    check_model_weights(model, path)
