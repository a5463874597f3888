"""The msgpack codec against openpi_client's `msgpack_numpy`, byte for byte."""

import msgpack
import numpy as np
import pytest
from serving_support import run_client

from keras_openpi.serving import msgpack_codec

# Built the same way here and in the client's environment (another numpy version).
OBJECTS_SOURCE = """
def make_objects():
    return [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
        np.arange(12, dtype=np.uint8).reshape(2, 2, 3),
        np.array([-3, 0, 70000], dtype=np.int64),
        np.array([1, -2], dtype=np.int16),
        np.array([0.5, -1.25], dtype=np.float16),
        np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float64),
        np.array([True, False]),
        np.array(["pick", "up"]),
        np.array(2.5, dtype=np.float32),
        np.arange(4, dtype=">f4"),
        np.arange(6, dtype=np.float32).reshape(2, 3).T,
        np.zeros((0, 3), dtype=np.float32),
        np.float32(1.5),
        np.int64(-7),
        np.bool_(True),
        np.uint8(200),
        {"state": np.ones(3, dtype=np.float32), "prompt": "go", "nested": {"ids": np.arange(3)}},
        [np.ones(2), "text", 3, 1.5, None, b"raw"],
        {"server_timing": {"infer_ms": 12.5}, "flag": True},
    ]
"""
_namespace = {"np": np}
exec(OBJECTS_SOURCE, _namespace)
make_objects = _namespace["make_objects"]


@pytest.fixture(scope="module")
def client_bytes():
    """openpi_client's packing of every object, and its repacking of our bytes."""
    ours = [msgpack_codec.packb(obj).hex() for obj in make_objects()]
    script = OBJECTS_SOURCE + """
from openpi_client import msgpack_numpy
theirs = [msgpack_numpy.packb(obj).hex() for obj in make_objects()]
repacked = [msgpack_numpy.packb(msgpack_numpy.unpackb(bytes.fromhex(h))).hex() for h in ARGS["ours"]]
print(json.dumps({"theirs": theirs, "repacked": repacked}))
"""
    return run_client(script, {"ours": ours})


def assert_same(expected, actual):
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        np.testing.assert_array_equal(actual, expected)
    elif isinstance(expected, np.generic):
        assert type(actual) is type(expected) and actual == expected
    elif isinstance(expected, dict):
        assert sorted(actual) == sorted(expected)
        for key in expected:
            assert_same(expected[key], actual[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for e, a in zip(expected, actual):
            assert_same(e, a)
    else:
        assert actual == expected


@pytest.mark.parametrize("index", range(len(make_objects())))
def test_bytes_equal_openpi_client(client_bytes, index):
    obj = make_objects()[index]
    ours = msgpack_codec.packb(obj)
    assert ours.hex() == client_bytes["theirs"][index]
    # The client decodes our bytes to the same object (it repacks them identically),
    # and we decode the client's bytes to the same object.
    assert client_bytes["repacked"][index] == ours.hex()
    assert_same(obj, msgpack_codec.unpackb(bytes.fromhex(client_bytes["theirs"][index])))


def test_array_layout():
    packed = msgpack_codec.packb(np.array([[1, 2, 3]], dtype=np.int32))
    assert msgpack.unpackb(packed) == {
        b"__ndarray__": True,
        b"data": np.array([1, 2, 3], "<i4").tobytes(),
        b"dtype": "<i4",
        b"shape": [1, 3],
    }
    scalar = msgpack.unpackb(msgpack_codec.packb(np.float32(0.5)))
    assert scalar == {b"__npgeneric__": True, b"data": 0.5, b"dtype": "<f4"}


def test_decoded_arrays_are_zero_copy_views():
    decoded = msgpack_codec.unpackb(msgpack_codec.packb(np.arange(3.0)))
    assert not decoded.flags.writeable and decoded.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "obj, error",
    [
        (np.array([object()]), "Unsupported dtype: object"),
        (np.array([1 + 2j]), "Unsupported dtype: complex128"),
        (np.zeros(2, dtype=[("a", "<f4")]), "Unsupported dtype"),
    ],
    ids=["object", "complex", "structured"],
)
def test_unsupported_dtypes_are_refused(obj, error):
    with pytest.raises(ValueError, match=error):
        msgpack_codec.packb(obj)


def test_unknown_objects_are_refused():
    with pytest.raises(TypeError, match="cannot serialize an object of type set"):
        msgpack_codec.packb({1, 2})


def _array_map(**fields):
    base = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "<f4", b"shape": [2]}
    return msgpack.packb({"state": {**base, **{k.encode(): v for k, v in fields.items()}}})


@pytest.mark.parametrize(
    "message, error",
    [
        (_array_map(data=b"\0" * 7), r"encoded <f4 array of shape \(2,\) needs 8 bytes, got 7"),
        (_array_map(dtype="<q9"), "unknown dtype '<q9'"),
        (_array_map(dtype="|O"), "unsupported dtype '|O'"),
        (_array_map(dtype=4), "dtype must be a string"),
        (_array_map(shape=[-2]), "shape must be a list of sizes"),
        (_array_map(data="text"), "data must be bytes, got str"),
        (
            msgpack.packb({b"__npgeneric__": True, b"data": "x", b"dtype": "<f4"}),
            "encoded <f4 scalar is invalid",
        ),
        (
            msgpack.packb({b"__npgeneric__": True, b"data": None, b"dtype": "<f8"}),
            "encoded <f8 scalar's data must be a number or a string, got NoneType",
        ),
        (
            msgpack.packb({b"__npgeneric__": True, b"data": [1, 2], b"dtype": "<f8"}),
            "encoded <f8 scalar's data must be a number or a string, got list",
        ),
        (_array_map(shape=[True, 1]), "shape must be a list of sizes"),
        (_array_map(shape=[1] * 65), r"shape \(1, 1, .* beyond numpy's limits \(at most 64 axes"),
        (_array_map(shape=[0, 2**62, 2**62]), r"shape \(0, 4611686018427387904, .* beyond numpy"),
    ],
    ids=[
        "short_data",
        "unknown_dtype",
        "object_dtype",
        "dtype_not_str",
        "negative_shape",
        "data_not_bytes",
        "bad_scalar",
        "none_scalar",
        "list_scalar",
        "bool_shape",
        "rank_65",
        "too_big",
    ],
)
def test_malformed_arrays_raise(message, error):
    with pytest.raises(msgpack_codec.MalformedArray, match=error):
        msgpack_codec.unpackb(message)


UNREADABLE = {
    "garbage": (
        b"\xc1\xc1 not msgpack",
        "it is not msgpack (send msgpack_numpy.packb(observation) as bytes).",
    ),
    "deep": (b"\x91" * 100_000 + b"\x01", "it nests maps or lists deeper than msgpack allows."),
    "extra": (
        msgpack.packb({"a": 1}) + b"xy",
        "it has 2 bytes after its first msgpack object; send one packed observation per message.",
    ),
    "truncated": (
        msgpack.packb({"a": [1, 2]})[:-1],
        "it ends before its msgpack object does (a truncated message).",
    ),
    "float_key": (msgpack.packb({1.5: 2}), "its maps must have str keys, got a float key."),
    "not_utf8": (
        b"\x81\xa1a\xa2\xff\xfe",
        "it holds a string that is not UTF-8 (invalid start byte at byte 0).",
    ),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_msgpack_errors_are_explained(case):
    message, reason = UNREADABLE[case]
    with pytest.raises(Exception) as error:
        msgpack_codec.unpackb(message)
    assert msgpack_codec.explain(error.value) == reason
