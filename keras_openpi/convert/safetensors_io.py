"""safetensors files read one tensor at a time and written as a stream, so no second copy of a model is held."""

import json
import os
import struct

import numpy as np

# safetensors dtype names and numpy dtypes (bfloat16 through ml_dtypes, which JAX brings).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32"}


def _numpy_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class SafetensorsReader:
    """Lazy access to one `.safetensors` file (a context manager).

    Args:
        path: the file.
        strip_prefix: a name prefix to drop where present (LeRobot stores its
            policy's weights under `model.`; openpi's PyTorch conversion does not).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file.
    """

    def __init__(self, path, strip_prefix=""):
        from safetensors import safe_open

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"No safetensors file at {self.path!r}.")
        try:
            self._file = safe_open(self.path, framework="np")
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{self.path!r} is not a readable safetensors file: {error}") from None
        self._names = {}
        for name in self._file.keys():
            short = name[len(strip_prefix) :] if strip_prefix and name.startswith(strip_prefix) else name
            self._names[short] = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file = None

    def keys(self):
        return list(self._names)

    def __contains__(self, key):
        return key in self._names

    def shape(self, key):
        return tuple(self._file.get_slice(self._names[key]).get_shape())

    def dtype(self, key):
        """The stored dtype as a numpy dtype name (`float32`, `bfloat16`, ...)."""
        stored = self._file.get_slice(self._names[key]).get_dtype()
        if stored not in _DTYPES:
            raise ValueError(f"{self.path!r}: tensor {key!r} has unsupported dtype {stored}.")
        return _DTYPES[stored]

    def get(self, key):
        """The tensor `key` as a numpy array, in its stored dtype."""
        if self.dtype(key) != "bfloat16":
            return self._file.get_tensor(self._names[key])
        # safetensors' numpy reader knows no bfloat16: read its bytes as uint16 and view them.
        raw = self._file.get_slice(self._names[key])
        with open(self.path, "rb") as handle:
            header_size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(header_size))
            begin, end = header[self._names[key]]["data_offsets"]
            handle.seek(8 + header_size + begin)
            data = np.frombuffer(handle.read(end - begin), dtype=np.uint16)
        return data.view(_numpy_dtype("bfloat16")).reshape(raw.get_shape())


def write_safetensors(path, tensors, metadata=None):
    """Writes a safetensors file tensor by tensor.

    Args:
        path: the file to write (written whole or not at all: a temporary file
            next to it is renamed at the end).
        tensors: `(name, dtype_name, shape, produce)` in file order; `produce()`
            returns the array (called once, just before it is written).
        metadata: optional `{str: str}` stored in the header.
    """
    header, offset = {}, 0
    for name, dtype, shape, _ in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * _numpy_dtype(dtype).itemsize
        stored = next(k for k, v in _DTYPES.items() if v == dtype)
        header[name] = {"dtype": stored, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for name, dtype, shape, produce in tensors:
                array = np.ascontiguousarray(produce(), dtype=_numpy_dtype(dtype))
                if array.shape != tuple(shape):
                    raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {tuple(shape)}.")
                handle.write(array.reshape(-1).view(np.uint8).data)
                del array
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
