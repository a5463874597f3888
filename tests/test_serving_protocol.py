"""`PolicyServer` in-process, with stand-in policies: serialization and internal errors.

These need no model: the policies below record how they are called. The real
client and a real model are in test_serving_server.py.
"""

import base64
import os
import re
import socket
import struct
import threading
import time

import numpy as np
import pytest
import websockets
from serving_support import Running
from websockets.sync.client import connect

from keras_openpi.serving import PolicyServer
from keras_openpi.serving import msgpack_codec


class OverlapRecorder:
    """Answers after a short sleep and records how many calls ran at once."""

    metadata = {"kind": "overlap"}

    def __init__(self):
        self.running = self.most_running = self.calls = 0
        self._count = threading.Lock()

    def infer(self, obs):
        with self._count:
            self.running += 1
            self.calls += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(0.02)
        with self._count:
            self.running -= 1
        return {"actions": np.full((2, 3), obs["state"][0], np.float32)}


class Broken:
    metadata = {}

    def infer(self, obs):
        raise RuntimeError("device lost\nsecond line")


def infer(websocket, state):
    websocket.send(msgpack_codec.packb({"state": np.array([state], np.float32)}))
    return websocket.recv(timeout=30)


def test_inference_never_interleaves_across_connections():
    policy = OverlapRecorder()
    replies = {}
    with Running(policy) as uri:
        barrier = threading.Barrier(8)

        def client(i):
            with connect(uri, compression=None, max_size=None) as websocket:
                assert msgpack_codec.unpackb(websocket.recv(timeout=30)) == {"kind": "overlap"}
                barrier.wait()
                replies[i] = [msgpack_codec.unpackb(infer(websocket, i)) for _ in range(3)]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert policy.calls == 24 and policy.most_running == 1
    for i in range(8):
        for reply in replies[i]:
            np.testing.assert_array_equal(reply["actions"], np.full((2, 3), i, np.float32))
            assert reply["server_timing"]["queue_ms"] >= 0.0
    # Waiting for other connections' inferences shows as queue time.
    assert max(r["server_timing"]["queue_ms"] for rs in replies.values() for r in rs) > 20.0


def test_internal_error_gets_a_one_line_reply_and_1011(caplog):
    with Running(Broken()) as uri:
        with connect(uri) as websocket:
            websocket.recv(timeout=30)
            assert infer(websocket, 0.0) == "internal error: RuntimeError: device lost second line"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                websocket.recv(timeout=30)
        assert closed.value.rcvd.code == 1011
        assert closed.value.rcvd.reason == (
            "Internal server error. Reason included in previous frame."
        )
        with connect(uri) as websocket:  # still serving
            assert msgpack_codec.unpackb(websocket.recv(timeout=30)) == {}
    assert "internal error" in caplog.text and "RuntimeError: device lost" in caplog.text


def test_server_can_run_again_after_stopping():
    policy = OverlapRecorder()
    for _ in range(2):
        with Running(policy) as uri, connect(uri) as websocket:
            websocket.recv(timeout=30)
            assert msgpack_codec.unpackb(infer(websocket, 1.0))["actions"].shape == (2, 3)
    assert policy.calls == 2


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="'max_message_bytes' must be positive, got 0"):
        PolicyServer(OverlapRecorder(), max_message_bytes=0)


# === Attacks on the websocket side ===


class Echo:
    """Answers `{"actions": state}`."""

    metadata = {"kind": "echo"}

    def infer(self, obs):
        return {"actions": np.asarray(obs["state"], np.float32)}


def assert_serves(uri, **connect_args):
    """A fresh connection gets the metadata and a reply (the server went on)."""
    with connect(uri, **connect_args) as websocket:
        websocket.recv(timeout=30)
        assert msgpack_codec.unpackb(infer(websocket, 2.0))["actions"].tolist() == [2.0]


def test_non_finite_actions_are_never_sent(caplog):
    from serving_support import ConstantModel
    from serving_support import model_request
    from serving_support import nan_where_state_is_negative

    from keras_openpi import Policy

    policy = Policy(ConstantModel(nan_where_state_is_negative))
    with Running(policy) as uri:
        with connect(uri) as websocket:
            websocket.recv(timeout=30)
            websocket.send(msgpack_codec.packb(model_request(0.5)))
            assert msgpack_codec.unpackb(websocket.recv(timeout=30))["actions"].tolist() == [
                [1.0] * 3
            ] * 2
            websocket.send(msgpack_codec.packb(model_request(-0.5)))
            assert websocket.recv(timeout=30) == (
                "internal error: the model's actions have 2 non-finite values of 6 (NaN or inf); "
                "no actions were sent."
            )
            with pytest.raises(websockets.ConnectionClosed) as closed:
                websocket.recv(timeout=30)
        assert closed.value.rcvd.code == 1011
        with connect(uri) as websocket:  # the server goes on
            websocket.recv(timeout=30)
            websocket.send(msgpack_codec.packb(model_request(0.5)))
            assert msgpack_codec.unpackb(websocket.recv(timeout=30))["actions"].shape == (2, 3)
    logged = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelname == "ERROR"
    assert "internal error: the model's actions have 2 non-finite" in logged[0].getMessage()


def _read_frame(stream):
    """The next data or close frame from the server (unmasked), past pings: `(opcode, payload)`."""
    while True:
        first, second = stream.read(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack(">H", stream.read(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", stream.read(8))[0]
        payload = stream.read(length)
        if first & 0x0F not in (0x9, 0xA):  # ping, pong
            return first & 0x0F, payload


def test_oversize_message_is_refused_from_its_header(caplog):
    # The frame header announces 390 MiB; only 1 KiB follows. The server answers
    # 1009 at once, so it never waited for (nor stored) the payload.
    with Running(Echo(), max_message_bytes=2**20) as uri:
        port = int(uri.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(
                (
                    f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            stream = sock.makefile("rb")
            assert stream.readline().startswith(b"HTTP/1.1 101")
            while stream.readline() != b"\r\n":  # the rest of the headers
                pass
            assert _read_frame(stream) == (0x2, msgpack_codec.packb(Echo.metadata))
            size = 390 * 2**20
            header = bytes([0x82, 0x80 | 127]) + struct.pack(">Q", size) + os.urandom(4)
            sock.sendall(header + b"\0" * 1024)
            opcode, payload = _read_frame(stream)
        assert opcode == 0x8
        assert struct.unpack(">H", payload[:2])[0] == 1009
        assert payload[2:].decode() == f"frame with {size} bytes exceeds limit of 1048576 bytes"
        assert_serves(uri)
    refused = f"refused: frame with {size} bytes exceeds limit of 1048576 bytes (--max-message-mb)"
    assert refused in caplog.text


def test_concurrent_oversize_messages_are_refused_and_the_server_goes_on():
    closes = []
    with Running(Echo(), max_message_bytes=2**20) as uri:

        def client():
            with connect(uri, max_size=None) as websocket:
                websocket.recv(timeout=30)
                try:
                    websocket.send(b"\0" * (3 * 2**20))
                    websocket.recv(timeout=30)
                except websockets.ConnectionClosed as closed:
                    closes.append((closed.rcvd.code, closed.rcvd.reason))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert_serves(uri)
    reason = f"frame with {3 * 2**20} bytes exceeds limit of 1048576 bytes"
    assert closes == [(1009, reason)] * 3


def test_two_authorization_headers_are_a_bad_request(caplog):
    with Running(Echo(), api_key="k") as uri:
        headers = [("Authorization", "Api-Key k"), ("Authorization", "Api-Key k")]
        with pytest.raises(websockets.InvalidStatus) as refused:
            connect(uri, additional_headers=headers)
        assert refused.value.response.status_code == 400
        assert refused.value.response.body.decode() == (
            "Bad request: 2 Authorization headers; send exactly one, "
            "'Authorization: Api-Key <key>'.\n"
        )
        assert_serves(uri, additional_headers={"Authorization": "Api-Key k"})
    assert "refused: 2 Authorization headers" in caplog.text


@pytest.mark.parametrize(
    "key, error",
    [
        ("", "the API key is empty ('')"),
        ("  \t", "the API key is empty ('  \\t')"),
        (" key", "the API key must be printable ASCII without leading or trailing spaces"),
        ("clé", "the API key must be printable ASCII"),
    ],
    ids=["empty", "whitespace", "padded", "non_ascii"],
)
def test_api_keys_no_client_can_send_are_refused(key, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        PolicyServer(Echo(), api_key=key)
