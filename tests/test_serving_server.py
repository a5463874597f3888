"""`keras-openpi serve` driven by openpi's own client (`openpi-client` 0.1.2 from PyPI).

One server process serves the whole module: a tiny π0 with norm stats next
to it, an API key, fixed noise (so every reply is checkable against the
policy run here), recording, and a 1 MiB message limit.
"""

import re
import time
import urllib.request

import numpy as np
import pytest
from serving_support import ServerProcess
from serving_support import make_request
from serving_support import run_client
from serving_support import tiny_pi0
from serving_support import write_norm_stats

from keras_openpi import Policy
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.serving.prompt import resolve_tokenizer
from keras_openpi.serving.robots import robot_transforms

API_KEY = "test-key"
DEFAULT_PROMPT = "pick cube"
CONNECT = """
import numpy as np
import websockets
from openpi_client import msgpack_numpy
from openpi_client.action_chunk_broker import ActionChunkBroker
from openpi_client.websocket_client_policy import WebsocketClientPolicy

def connect(api_key=ARGS.get("key")):
    return WebsocketClientPolicy("127.0.0.1", ARGS["port"], api_key=api_key)
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    model = tiny_pi0()
    model.save(directory / "tiny.keras")
    write_norm_stats(directory)
    args = [
        directory / "tiny.keras",
        "--api-key",
        API_KEY,
        "--default-prompt",
        DEFAULT_PROMPT,
        "--seed",
        "0",
        "--fixed-noise",
        "--record",
        directory / "records",
        "--max-message-mb",
        "1",
    ]
    server = ServerProcess(args).start()
    try:
        # The same policy, run here while the server starts: replies must equal its actions.
        inputs, outputs = robot_transforms(
            "raw",
            model,
            norm_stats=load_norm_stats(directory),
            tokenizer=resolve_tokenizer(None, model),
            default_prompt=DEFAULT_PROMPT,
        )
        server.reference = Policy(
            model, transforms=inputs, output_transforms=outputs, seed=0, fixed_noise=True
        )
        server.records = directory / "records"
        yield server.wait_ready()
    finally:
        code = server.stop()
    assert code == 0, server.log()[-3000:]


def client(served, script, **args):
    return run_client(CONNECT + script, {"port": served.port, "key": API_KEY, **args})


def wait_for_log(served, pattern, count=1, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(pattern, served.log())) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"{pattern!r} not {count} times in the server log:\n{served.log()[-3000:]}"
    )


def expected_actions(served, seed):
    return served.reference.infer(make_request(seed))["actions"]


def test_healthz_needs_no_key(served):
    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/healthz", timeout=10) as reply:
        assert reply.status == 200 and reply.read() == b"OK\n"


def test_handshake_replies_and_chunk_broker(served):
    result = client(
        served,
        """
policy = connect()
first, second = policy.infer(make_request(0)), policy.infer(make_request(0))
broker = ActionChunkBroker(policy, action_horizon=4)
steps = [broker.infer(make_request(0))["actions"].tolist() for _ in range(6)]
policy._ws.close()
print(json.dumps({
    "metadata": policy.get_server_metadata(),
    "keys": sorted(first),
    "dtype": str(first["actions"].dtype),
    "actions": first["actions"].tolist(),
    "policy_timing": first["policy_timing"],
    "timings": [first["server_timing"], second["server_timing"]],
    "steps": steps,
}))
""",
    )
    assert result["metadata"] == {"robot": "raw", "model_type": "pi0", "action_horizon": 4}
    assert result["keys"] == ["actions", "policy_timing", "server_timing"]
    expected = expected_actions(served, 0)
    # float64 after unnormalization, as openpi's (float64 norm stats).
    assert result["dtype"] == str(expected.dtype) == "float64"
    actions = np.array(result["actions"])
    assert actions.shape == (4, 8)
    np.testing.assert_allclose(actions, expected, atol=1e-5)
    assert result["policy_timing"]["infer_ms"] > 0
    first, second = result["timings"]
    assert sorted(first) == ["infer_ms", "queue_ms"]
    assert sorted(second) == ["infer_ms", "prev_total_ms", "queue_ms"]
    assert second["prev_total_ms"] >= first["infer_ms"] > 0
    # The broker hands out one step per call and asks again after 4 steps.
    steps = np.array(result["steps"])
    assert steps.shape == (6, 8)
    np.testing.assert_allclose(steps, np.concatenate([actions, actions[:2]]), atol=1e-6)
    wait_for_log(served, r"disconnected \(code 1000\) after 4 requests, mean infer [\d.]+ ms")


def test_eight_concurrent_clients_get_their_own_replies(served):
    result = client(
        served,
        """
import threading
barrier, replies = threading.Barrier(8), {}

def run(i):
    policy = connect()
    barrier.wait()
    replies[str(i)] = [policy.infer(make_request(i))["actions"].tolist() for _ in range(3)]
    policy._ws.close()

threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(replies))
""",
    )
    assert sorted(result) == [str(i) for i in range(8)]
    for i in range(8):
        expected = expected_actions(served, i)
        for reply in result[str(i)]:
            np.testing.assert_allclose(np.array(reply), expected, atol=1e-5)
    # Different observations give different actions, so a mix-up could not pass.
    assert np.abs(expected_actions(served, 0) - expected_actions(served, 1)).max() > 1e-2


BAD_INPUTS = """
import msgpack

def bad(request):
    return lambda policy: policy.infer(request)

def raw(data):
    def send(policy):
        policy._ws.send(data)
        reply = policy._ws.recv(timeout=30)
        if isinstance(reply, str):
            raise RuntimeError("Error in inference server:\\n" + reply)
    return send

good = make_request(0)
image = dict(good["image"])
cases = {
    "not_msgpack": raw(b"\\xc1\\xc1 not msgpack"),
    "text_frame": raw("hello"),
    "not_a_map": raw(msgpack_numpy.packb([1, 2, 3])),
    "malformed_array": raw(msgpack.packb({"state": {
        b"__ndarray__": True, b"data": b"\\0" * 3, b"dtype": "<f4", b"shape": [5]}})),
    "missing_state": bad({k: v for k, v in good.items() if k != "state"}),
    "image_shape": bad({**good, "image": {**image, "base_0_rgb": np.zeros((32, 32, 4), np.uint8)}}),
    "image_dtype": bad({**good, "image": {**image, "base_0_rgb": np.zeros((32, 32, 3), np.int64)}}),
    "nan_state": bad({**good, "state": np.array([0.0, np.nan], np.float32)}),
    "inf_state": bad({**good, "state": np.array([np.inf], np.float32)}),
    "float32_overflow_state": bad({**good, "state": np.full(5, 3e38, np.float32)}),
    "float64_overflow_state": bad({**good, "state": np.full(5, 1e300)}),
    "scalar_state": bad({**good, "state": np.float32(1.0)}),
    "text_state": bad({**good, "state": "0.1 0.2"}),
    "empty_image": bad({**good, "image": {**image, "base_0_rgb": np.zeros((0, 0, 3), np.uint8)}}),
    "thin_image": bad({**good, "image": {**image, "base_0_rgb": np.zeros((1, 900, 3), np.uint8)}}),
    "mask_not_dict": bad({**good, "image_mask": True}),
    "mask_not_bool": bad({**good, "image_mask": {"base_0_rgb": "yes"}}),
    "prompt_not_utf8": bad({**good, "prompt": b"\\xff\\xfe"}),
    "bytes_key": bad({**good, b"state": good["state"]}),
    "oversize": bad({**good, "padding": np.zeros(1_500_000, np.uint8)}),
    "far_oversize": bad({**good, "padding": np.zeros(5_000_000, np.uint8)}),
}
results = {}
for name, send in cases.items():
    policy, out = connect(), {"error": None}
    try:
        send(policy)
    except RuntimeError as error:
        out["error"] = str(error)
    except websockets.ConnectionClosed:
        pass
    try:
        policy._ws.recv(timeout=30)
    except websockets.ConnectionClosed as closed:
        out["close"] = [closed.rcvd.code, closed.rcvd.reason] if closed.rcvd else None
    again = connect()
    out["after"] = list(again.infer(make_request(1))["actions"].shape)
    again._ws.close()
    results[name] = out
print(json.dumps(results))
"""
IMAGE = "'image/base_0_rgb' must be one RGB image, (h, w, 3) or (3, h, w), uint8 or float in [0, 1]"
OVERFLOW = (
    "at index (0,) after the robot's transforms and normalization; the model's float32 needs "
    "finite values within ±1.84e+19. Check the units of 'state' and the norm stats."
)
BAD_REQUEST_ERRORS = {
    "not_msgpack": "the message is not a msgpack observation: it is not msgpack (send "
    "msgpack_numpy.packb(observation) as bytes).",
    "text_frame": "expected a binary msgpack observation, got a text frame",
    "not_a_map": "the message must be a msgpack map of named arrays (an observation dict), got "
    "list",
    "malformed_array": "the message holds a malformed array: an encoded <f4 array of shape (5,) "
    "needs 20 bytes, got 3",
    "missing_state": "RawInputs: the sample has no 'state'",
    "image_shape": IMAGE + ", got uint8 array of shape (32, 32, 4).",
    "image_dtype": IMAGE + ", got int64 array of shape (32, 32, 3).",
    "nan_state": "'state' has a non-finite value (nan) at index (1,); expected finite numbers.",
    "inf_state": "'state' has a non-finite value (inf) at index (0,); expected finite numbers.",
    "float32_overflow_state": "'state' has the value 3e+38 " + OVERFLOW,
    "float64_overflow_state": "'state' has the value 9.99999e+299 " + OVERFLOW,  # normalized
    "scalar_state": "'state' must be a numeric array of rank 1, got float32 scalar.",
    "text_state": "'state' must be a numeric array of rank 1, got str.",
    "empty_image": IMAGE + ", got an empty uint8 array of shape (0, 0, 3).",
    "thin_image": "'image/base_0_rgb' of 1x900 pixels is too thin to resize to the model's 32x32 "
    "(it would be 0x32 pixels); send an image of a less extreme aspect ratio.",
    "mask_not_dict": "'image_mask' must be a dict {camera: bool} over the cameras of 'image', "
    "got bool.",
    "mask_not_bool": "'image_mask/base_0_rgb' must be one bool, got str.",
    "prompt_not_utf8": "'prompt' must be UTF-8 text, got bytes that are not UTF-8 (invalid start "
    "byte at byte 0); send the prompt as a str.",
    "bytes_key": "the observation's keys must be str, got the bytes key b'state' in "
    "'the observation'.",
}


@pytest.fixture(scope="module")
def bad_input_results(served):
    return client(served, BAD_INPUTS)


@pytest.mark.parametrize("case", sorted(BAD_REQUEST_ERRORS))
def test_bad_input_gets_an_error_frame_and_the_server_goes_on(served, bad_input_results, case):
    result = bad_input_results[case]
    prefix = "Error in inference server:\nbad request: "
    assert result["error"].startswith(prefix)
    reason = result["error"][len(prefix) :]
    assert BAD_REQUEST_ERRORS[case] in reason and "\n" not in reason
    assert result["close"] == [1011, "Bad request. Reason included in previous frame."]
    assert result["after"] == [4, 8]
    wait_for_log(
        served,
        re.escape("WARNING keras_openpi.serving: 127.0.0.1:")
        + r"\d+ bad request: "
        + re.escape(reason),
    )


@pytest.mark.parametrize("case, size", [("oversize", 1_500_000), ("far_oversize", 5_000_000)])
def test_oversize_message_is_refused_by_the_websocket_layer(served, bad_input_results, case, size):
    # Refused from its frame header, before it is read (code 1009, message too big).
    result = bad_input_results[case]
    assert result["error"] is None and result["close"][0] == 1009
    pattern = r"frame with (\d+) bytes exceeds limit of 1048576 bytes"
    reason = re.fullmatch(pattern, result["close"][1])
    assert size < int(reason.group(1)) < size + 20_000  # the padding and the observation
    assert result["after"] == [4, 8]
    refused = f"refused: {reason.group(0)} (--max-message-mb); closed with 1009"
    wait_for_log(served, re.escape(refused))


def test_api_key_is_required(served):
    result = client(
        served,
        """
out = {}
for name, key in (("wrong", "not-the-key"), ("missing", None)):
    try:
        connect(api_key=key)
        out[name] = "connected"
    except websockets.InvalidStatus as error:
        out[name] = [error.response.status_code, error.response.body.decode()]
print(json.dumps(out))
""",
    )
    refused = [401, "Unauthorized: send the header 'Authorization: Api-Key <key>'.\n"]
    assert result == {"wrong": refused, "missing": refused}
    wait_for_log(served, r"refused: wrong API key")
    wait_for_log(served, r"refused: no API key")


def test_requests_and_replies_are_recorded(served):
    before = set(served.records.iterdir())
    result = client(
        served,
        """
policy = connect()
reply = policy.infer(make_request(5))
policy._ws.close()
print(json.dumps({"actions": reply["actions"].tolist()}))
""",
    )
    new = set(served.records.iterdir()) - before
    assert len(new) == 1
    record = np.load(new.pop(), allow_pickle=True).item()
    request = make_request(5)
    np.testing.assert_array_equal(record["inputs/state"], request["state"])
    np.testing.assert_array_equal(record["inputs/image/base_0_rgb"], request["image"]["base_0_rgb"])
    assert record["inputs/prompt"] == request["prompt"]
    np.testing.assert_array_equal(record["outputs/actions"], np.array(result["actions"]))
    assert record["outputs/policy_timing/infer_ms"] > 0
