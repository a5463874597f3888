"""Shared pieces of the serving tests: a tiny policy model, requests, the real openpi client.

openpi's own client (`openpi-client` from PyPI, which pins numpy < 2) lives in
its own virtual environment: `KERAS_OPENPI_CLIENT_PYTHON`, by default
`<repo>/.venv-client/bin/python` (scripts/test.sh creates it). Client code
runs there as small scripts; they print one JSON object.
"""

import asyncio
import json
import os
import pathlib
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CLIENT_PYTHON_ENV = "KERAS_OPENPI_CLIENT_PYTHON"

GEMMA = dict(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
TINY_PI0 = dict(
    paligemma_variant=GEMMA,
    action_expert_variant=dict(GEMMA, width=16, mlp_dim=32),
    vision_variant=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16),
    vocabulary_size=259,  # the byte tokenizer's
    action_dim=8,
    action_horizon=4,
    max_token_len=16,
    image_resolution=(32, 32),
    seed=0,
)
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
STATE_DIM = 5

# Requests are built by this code both here and in the client's environment
# (another numpy), so it uses arithmetic only: the same seed gives the same bytes.
REQUEST_SOURCE = """
import numpy as np

def make_request(seed, prompt="pick cube"):
    pixels = np.arange(32 * 32 * 3).reshape(32, 32, 3)
    image = {
        name: ((pixels * (seed + 2 + i) + 17 * seed) % 251).astype(np.uint8)
        for i, name in enumerate(("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"))
    }
    state = (np.linspace(-1.0, 1.0, 5) * (1 + seed % 3) + 0.1 * seed).astype(np.float32)
    request = {"image": image, "state": state}
    if prompt is not None:
        request["prompt"] = prompt
    return request
"""
_namespace = {}
exec(REQUEST_SOURCE, _namespace)
make_request = _namespace["make_request"]


def tiny_pi0():
    from keras_openpi.models import Pi0

    return Pi0(**TINY_PI0)


def write_norm_stats(directory):
    """Writes z-score / quantile stats of width STATE_DIM for state and actions."""
    from keras_openpi.data.normalize import NormStats
    from keras_openpi.data.normalize import save_norm_stats

    width = np.arange(STATE_DIM, dtype=np.float64)
    stats = NormStats(mean=0.1 * width, std=1.0 + 0.5 * width, q01=-1.0 - width, q99=1.0 + width)
    return save_norm_stats(directory, {"state": stats, "actions": stats})


def client_python():
    default = REPO / ".venv-client" / "bin" / "python"
    path = pathlib.Path(os.environ.get(CLIENT_PYTHON_ENV, default))
    if not path.exists():
        pytest.fail(
            f"openpi's client python {path} not found: run scripts/test.sh (it creates "
            f".venv-client with `pip install openpi-client==0.1.2`) or set {CLIENT_PYTHON_ENV}."
        )
    return str(path)


def run_client(script, args=None, timeout=120):
    """Runs `script` with openpi's client; it gets `ARGS` (a dict) and prints one JSON object."""
    prelude = f"import json, sys\nARGS = json.loads(sys.argv[1])\n{REQUEST_SOURCE}\n"
    done = subprocess.run(
        [client_python(), "-c", prelude + script, json.dumps(args or {})],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise AssertionError(f"client script failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class ServerProcess:
    """`keras-openpi serve MODEL --port 0 ...` in a subprocess, with its log collected.

    `start()` launches it and returns at once; `wait_ready()` waits for its
    "listening on" line and reads the port from it.

    Example:
    >>> server = ServerProcess(["model.keras", "--api-key", "k"]).start()  # doctest: +SKIP
    >>> server.wait_ready().port  # doctest: +SKIP
    """

    def __init__(self, args):
        self.args = [sys.executable, "-m", "keras_openpi", "serve", *map(str, args), "--port", "0"]
        self.lines = []
        self._queue = queue.Queue()

    def start(self):
        env = dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def wait_ready(self, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            match = re.search(r"listening on ws://[\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return self
        self.stop()
        raise AssertionError("the server did not start:\n" + "".join(self.lines[-40:]))

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)
            self._queue.put(line)

    def log(self):
        return "".join(self.lines)

    def stop(self):
        """Sends SIGTERM and returns the exit code (killing it after 30 s)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class Running:
    """A `PolicyServer` on a loopback port, run by an event loop in a thread."""

    def __init__(self, policy, **kwargs):
        from keras_openpi.serving import PolicyServer

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


class ConstantModel:
    """Stands in for a `Pi0` in a `Policy`: its actions are `actions_for(batch)`."""

    model_type = "pi0"
    image_keys = ("base_0_rgb",)
    image_resolution = (4, 4)
    action_dim, action_horizon, max_token_len, vocabulary_size = 3, 2, 4, 10
    compute_dtype = "float32"

    def __init__(self, actions_for):
        self.actions_for = actions_for

    def sample_actions(self, batch, noise, num_steps):
        return np.broadcast_to(self.actions_for(batch), noise.shape).astype(np.float32)


def model_request(state=0.5):
    return {
        "image": {"base_0_rgb": np.zeros((4, 4, 3), np.uint8)},
        "state": np.array([state], np.float32),
        "tokenized_prompt": np.array([1, 2]),
    }


def nan_where_state_is_negative(batch):
    """Ones; NaN in 2 of the 6 action values of a sample whose state is negative."""
    actions = np.ones((len(batch["state"]), 2, 3))
    actions[batch["state"][:, 0] < 0, 0, :2] = np.nan
    return actions
