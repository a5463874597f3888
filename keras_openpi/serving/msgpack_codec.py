"""openpi's wire format: msgpack with numpy arrays as tagged maps.

An array travels as the map `{b"__ndarray__": True, b"data": <raw bytes>,
b"dtype": dtype.str, b"shape": [dims]}` and a numpy scalar as
`{b"__npgeneric__": True, b"data": <python value>, b"dtype": dtype.str}`,
exactly as `openpi_client.msgpack_numpy` writes them (same keys, same order,
same msgpack options), so that bytes packed here equal the client's bytes for
the same object. Decoding also accepts what the client sends, and rejects
malformed array maps with a `ValueError` instead of crashing on them
(`explain` words msgpack's own errors for a client).
"""

import functools
import math

import msgpack
import numpy as np

# Object, void (structured) and complex arrays do not cross the wire (as in openpi).
UNSUPPORTED_DTYPE_KINDS = ("V", "O", "c")
# numpy's limits on an array: its rank, and its size in bytes (counting empty axes as 1).
MAX_ARRAY_RANK = 64
MAX_ARRAY_BYTES = 2**63 - 1
# What openpi's client sends as a scalar's data: `numpy_scalar.item()`.
SCALAR_DATA_TYPES = (bool, int, float, str, bytes)


class MalformedArray(ValueError):
    """A tagged array or scalar map whose dtype, shape and data do not agree."""


def encode_numpy(obj):
    """msgpack's `default` hook: numpy arrays and scalars to openpi's tagged maps.

    Raises:
        ValueError: for object, structured or complex dtypes.
        TypeError: for any other object msgpack cannot pack.
    """
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in UNSUPPORTED_DTYPE_KINDS:
        raise ValueError(f"Unsupported dtype: {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {
            b"__ndarray__": True,
            b"data": obj.tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialize an object of type {type(obj).__name__}")


def _wire_dtype(value):
    if not isinstance(value, str):
        raise MalformedArray(f"an encoded array's dtype must be a string, got {value!r:.40}.")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        raise MalformedArray(f"an encoded array has an unknown dtype {value!r:.40}.") from None
    if dtype.kind in UNSUPPORTED_DTYPE_KINDS:
        raise MalformedArray(f"an encoded array has the unsupported dtype {value!r}.")
    return dtype


def decode_numpy(obj):
    """msgpack's `object_hook`: openpi's tagged maps back to numpy (zero-copy, read-only arrays).

    Raises:
        MalformedArray: for a tagged map whose dtype, shape or data do not agree.
    """
    if b"__ndarray__" in obj:
        dtype = _wire_dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or not all(
            type(d) is int and d >= 0 for d in shape
        ):
            raise MalformedArray(
                f"an encoded array's shape must be a list of sizes, got {shape!r:.60}."
            )
        nonzero_bytes = math.prod(max(d, 1) for d in shape) * max(dtype.itemsize, 1)
        if len(shape) > MAX_ARRAY_RANK or nonzero_bytes > MAX_ARRAY_BYTES:
            raise MalformedArray(
                f"an encoded array's shape {tuple(shape)!s:.80} is beyond numpy's limits "
                f"(at most {MAX_ARRAY_RANK} axes and {MAX_ARRAY_BYTES:,} bytes)."
            )
        if not isinstance(data, bytes):
            raise MalformedArray(
                f"an encoded array's data must be bytes, got {type(data).__name__}."
            )
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise MalformedArray(
                f"an encoded {dtype.str} array of shape {tuple(shape)} needs {expected} bytes, "
                f"got {len(data)}."
            )
        return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))
    if b"__npgeneric__" in obj:
        dtype = _wire_dtype(obj.get(b"dtype"))
        data = obj.get(b"data")
        if not isinstance(data, SCALAR_DATA_TYPES):
            raise MalformedArray(
                f"an encoded {dtype.str} scalar's data must be a number or a string, got "
                f"{type(data).__name__}."
            )
        try:
            return dtype.type(data)
        except (TypeError, ValueError, OverflowError) as error:
            raise MalformedArray(f"an encoded {dtype.str} scalar is invalid: {error}") from None
    return obj


def explain(error):
    """One line saying why `unpackb` failed on a message, for the client that sent it."""
    if isinstance(error, msgpack.ExtraData):
        return (
            f"it has {len(error.extra):,} bytes after its first msgpack object; send one "
            "packed observation per message."
        )
    if isinstance(error, msgpack.StackError):
        return "it nests maps or lists deeper than msgpack allows."
    if isinstance(error, msgpack.FormatError):
        return "it is not msgpack (send msgpack_numpy.packb(observation) as bytes)."
    text = " ".join(str(error).split())
    if "incomplete input" in text:
        return "it ends before its msgpack object does (a truncated message)."
    if "is not allowed for map key" in text:
        return f"its maps must have str keys, got a {text.split()[0]} key."
    if isinstance(error, UnicodeDecodeError):
        return f"it holds a string that is not UTF-8 ({error.reason} at byte {error.start})."
    return f"{text} ({type(error).__name__})." if text else f"{type(error).__name__}."


Packer = functools.partial(msgpack.Packer, default=encode_numpy)
packb = functools.partial(msgpack.packb, default=encode_numpy)
unpackb = functools.partial(msgpack.unpackb, object_hook=decode_numpy)
