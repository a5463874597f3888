"""`PolicyServer` in-process, with stand-in policies: serialization and internal errors.

These need no model: the policies below record how they are called. The real
client and a real model are in test_serving_server.py.
"""

import asyncio
import threading
import time

import numpy as np
import pytest
import websockets
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


class Running:
    """A `PolicyServer` on a loopback port, run by an event loop in a thread."""

    def __init__(self, policy, **kwargs):
        self.server = PolicyServer(policy, port=0, **kwargs)

    def __enter__(self):
        self.loop, self.stop = asyncio.new_event_loop(), asyncio.Event()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.run(self.stop),)
        )
        self.thread.start()
        assert self.server.listening.wait(30)
        return f"ws://127.0.0.1:{self.server.port}"

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        self.loop.close()


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
