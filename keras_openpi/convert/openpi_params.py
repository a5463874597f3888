"""Reading openpi parameter files: orbax `params/` directories and flat `.npz` files.

Every array is checked as it is read (`check_weight`): a NaN, an infinity or
a magnitude no trained network has (a byte pattern from a damaged file) is an
error naming the openpi path, so no corrupt checkpoint becomes a policy.
"""

import contextlib
import gc
import io
import json
import logging
import os
import re
import sys
import time
import zipfile
import zlib

import keras
import numpy as np

from keras_openpi.data.transforms import flatten_dict

# No trained weight comes near this; random bytes read as floats do (about 4 in 10 of them).
MAX_ABS_WEIGHT = 1e6
# The dtypes a parameter is kept in as stored (openpi releases bfloat16 and float32 trees);
# float64 is read as float32, anything else is an error.
KEPT_DTYPES = ("float32", "bfloat16", "float16")


def check_weight(name, array, source):
    """Raises a `ValueError` naming `name` if `array` holds NaN, inf or |w| > `MAX_ABS_WEIGHT`.

    Two reductions (min and max, NaN propagating) and no temporary copy; the
    offending index is only searched for when the check fails.

    Args:
        name: the weight's path (openpi or Keras), for the message.
        array: a numpy array.
        source: the file it came from, for the message.
    """
    # Keras' test, not np.floating: ml_dtypes' bfloat16 (openpi's released dtype) is not np.floating.
    if array.size == 0 or not keras.backend.is_float_dtype(array.dtype):
        return
    low, high = array.min(), array.max()
    if -MAX_ABS_WEIGHT <= low and high <= MAX_ABS_WEIGHT:
        return
    finite = np.isfinite(array)
    if not finite.all():
        index = np.unravel_index(int(np.argmin(finite)), array.shape)
        count = int(array.size - np.count_nonzero(finite))
        raise ValueError(
            f"{source}: weight {name!r} holds {array[index]} at index {tuple(map(int, index))} "
            f"({count} non-finite values of {array.size}); a policy with such weights gives "
            "non-finite actions. The file is damaged or comes from a diverged run."
        )
    index = np.unravel_index(int(np.argmax(np.abs(array) > MAX_ABS_WEIGHT)), array.shape)
    raise ValueError(
        f"{source}: weight {name!r} holds {float(array[index]):.4g} at index "
        f"{tuple(map(int, index))}, beyond the |w| <= {MAX_ABS_WEIGHT:.0e} of any trained "
        "weight; the file is damaged (random bytes read as floats) or comes from a diverged run."
    )


def _normalize_path(path):
    parts = path.split("/")
    if parts and parts[0] == "params":
        parts = parts[1:]
    if parts and parts[-1] == "value":  # nnx.State leaves saved during training
        parts = parts[:-1]
    return "/".join(parts)


class _Capture(io.TextIOBase, logging.Handler):
    """Holds back text written to it and log records handed to it."""

    def __init__(self):
        io.TextIOBase.__init__(self)
        logging.Handler.__init__(self)
        self.parts, self.records, self.last_write = [], [], time.monotonic()

    def write(self, text):
        self.parts.append(text)
        self.last_write = time.monotonic()
        return len(text)

    def emit(self, record):
        self.records.append(record)
        self.last_write = time.monotonic()


@contextlib.contextmanager
def _quiet_orbax_failure(quiet_s=0.5, max_wait_s=10.0):
    """Holds back what orbax prints and logs while it reads; drops it if the read fails.

    When one array of an orbax checkpoint cannot be read, orbax closes its
    event loop while tensorstore still completes the other reads, and each
    of those prints an "Event loop is closed" traceback from its own thread
    (and orbax logs warnings about the metadata). The reason is in the
    exception; the rest is noise. On success it is all passed on.
    """
    real, capture, hook = sys.stderr, _Capture(), sys.unraisablehook
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    saved = [(log.handlers, log.propagate) for log in loggers]

    def drop_closed_loop(unraisable):  # tensorstore's reads finishing after orbax gave up
        if str(unraisable.exc_value) != "Event loop is closed":
            hook(unraisable)

    sys.stderr, sys.unraisablehook = capture, drop_closed_loop
    for log in loggers:
        log.handlers, log.propagate = [capture], False
    try:
        yield
    except BaseException:
        gc.collect()  # "Task exception was never retrieved", logged now while held back
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() - capture.last_write < quiet_s and time.monotonic() < deadline:
            time.sleep(0.05)
        raise
    else:
        real.write("".join(capture.parts))
    finally:
        sys.stderr, sys.unraisablehook = real, hook
        for log, (handlers, propagate) in zip(loggers, saved):
            log.handlers, log.propagate = handlers, propagate
    for record in capture.records:
        logging.getLogger(record.name).handle(record)


def _orbax_reason(error):
    """A one-line reason from an orbax / tensorstore error, naming the weight it was reading."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    weight = re.search(r'Error reading "params\.([^"/]+)', text)
    detail = text[text.rfind('": ') + 3 :] if '": ' in text else text
    detail = detail if len(detail) <= 240 else detail[:240] + "..."
    if weight:
        name = _normalize_path(weight.group(1).replace(".", "/"))
        return f"cannot read weight {name!r} ({detail})"
    if isinstance(error, (UnicodeDecodeError, json.JSONDecodeError)):
        return f"its metadata (_METADATA) is not valid JSON ({detail})"
    return f"{type(error).__name__}: {detail}"


def _read_orbax(path):
    import jax
    import orbax.checkpoint as ocp

    if not os.path.isfile(os.path.join(path, "_METADATA")):
        raise ValueError(
            f"{path} is not an openpi orbax checkpoint: it has no _METADATA (expected a "
            "checkpoint's params/ directory, e.g. pi0_base/params, or an .npz file)."
        )
    try:
        with _quiet_orbax_failure():
            checkpointer = ocp.PyTreeCheckpointer()
            metadata = checkpointer.metadata(path)
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            return checkpointer.restore(
                path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
            )
    except Exception as error:  # orbax, tensorstore and json raise many kinds
        raise ValueError(
            f"the openpi checkpoint {path} is damaged or incomplete: {_orbax_reason(error)}."
        ) from None


def _read_npz(path):
    """`{name: array}` of the parameter entries of an `.npz` file (CRC-checked by zipfile)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not an .npz file (no zip archive there: truncated, or another format); "
            "expected openpi parameters saved with np.savez."
        )
    out, name = {}, None
    try:
        with np.load(path, allow_pickle=False) as data:
            for name in data.files:
                if not name.startswith(("input/", "output/")) and name != "meta":
                    out[name] = data[name]
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as error:
        entry = "" if name is None else f" (entry {name!r})"
        raise ValueError(f"{path} is damaged{entry}: {error}.") from None
    return out


def load_openpi_params(path):
    """Loads openpi parameters into a flat `{openpi_path: array}` dict, in their stored dtype.

    Arrays stay float32, bfloat16 or float16 as stored (float64 becomes float32),
    so a released bfloat16 checkpoint is held once, in half the memory of
    float32; the weight maps cast one weight at a time into the model's dtype.

    Args:
        path: an openpi orbax `params/` directory (released or written by
            openpi's training, with or without trailing `value` keys, bfloat16
            frozen weights included) or an `.npz` of flat `/`-joined paths (a
            leading `params/` is ignored; non-parameter entries of the test
            fixtures such as `input/...` are skipped).

    Returns:
        dict mapping paths like `PaliGemma/llm/layers/attn/q_einsum/w` to arrays.
        The read tree is emptied as the dict fills, so no array is held twice.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: a file that cannot be read (named, with the weight when
            known), or a weight with NaN, inf or an impossible magnitude.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No openpi checkpoint at {path!r}.")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "_METADATA")) and os.path.isdir(
            os.path.join(path, "params")
        ):
            path = os.path.join(path, "params")  # a step directory was given
        flat = flatten_dict(_read_orbax(path))
    else:
        flat = _read_npz(path)
    params = {}
    for key in list(flat):
        name = _normalize_path(key)
        array = np.asarray(flat.pop(key))
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        if array.dtype.name not in KEPT_DTYPES:
            raise ValueError(
                f"{path}: weight {name!r} has dtype {array.dtype}; expected floating point "
                f"({', '.join(KEPT_DTYPES)} or float64)."
            )
        check_weight(name, array, path)
        params[name] = array
    if not params:
        raise ValueError(f"{path!r} holds no parameters.")
    return params
