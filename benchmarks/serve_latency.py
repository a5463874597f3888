"""Round-trip latency and throughput of `keras-openpi serve` for 1 and 8 concurrent clients.

The model is the small π0 of `keras-openpi demo` (three 96x96 cameras, action
horizon 10, byte-level prompts), saved to a temporary `.keras` file and
served by a real `keras-openpi serve` process on a loopback port. Clients
speak openpi's protocol (websockets + the msgpack-numpy layout, byte for byte
what `openpi_client.WebsocketClientPolicy` sends) from threads of this
process; each request carries three uint8 cameras, an 8-dim state and a
prompt, as a robot sends them. After a warm-up request per client, every
client sends `--requests` requests back to back; the JSON holds p50/p95/p99
of the round trips (client send to reply decoded), the throughput (requests
per second over the wall time of the run), and the server's own `infer_ms`
and `queue_ms`. Client and server share the machine's CPUs, so on a small
machine the figures include their competition.

Usage:
    python benchmarks/serve_latency.py [--json PATH] [--requests N] [--num-steps N]
"""

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from keras_openpi.models.presets import DEMO_MODEL  # noqa: E402
from keras_openpi.serving import msgpack_codec  # noqa: E402

CONCURRENCY = (1, 8)


def make_request(seed):
    rng = np.random.default_rng(seed)
    height, width = DEMO_MODEL["image_resolution"]
    return {
        "image": {
            key: rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for key in ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
        },
        "state": rng.uniform(-1, 1, 3).astype(np.float32),
        "prompt": "move to the red square",
    }


def start_server(model_path, num_steps):
    command = [
        sys.executable,
        "-m",
        "keras_openpi",
        "serve",
        str(model_path),
        "--port",
        "0",
        "--num-steps",
        str(num_steps),
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        match = re.search(r"listening on ws://[\d.]+:(\d+)", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(match.group(1))
    raise RuntimeError(f"the server exited with code {process.wait()} before listening")


def run_client(port, seed, requests, barrier, out):
    request = msgpack_codec.packb(make_request(seed))
    with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as websocket:
        msgpack_codec.unpackb(websocket.recv())  # metadata
        websocket.send(request)
        msgpack_codec.unpackb(websocket.recv())  # warm-up
        barrier.wait()
        for _ in range(requests):
            start = time.perf_counter()
            websocket.send(request)
            reply = msgpack_codec.unpackb(websocket.recv())
            out.append((time.perf_counter() - start, reply["server_timing"]))


def measure(port, clients, requests):
    barrier, out = threading.Barrier(clients + 1), []
    threads = [
        threading.Thread(target=run_client, args=(port, i, requests, barrier, out))
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    round_trips = np.array([seconds for seconds, _ in out]) * 1000.0
    infer = np.array([timing["infer_ms"] for _, timing in out])
    queue = np.array([timing["queue_ms"] for _, timing in out])
    return {
        "clients": clients,
        "requests": len(out),
        "p50_ms": float(np.percentile(round_trips, 50)),
        "p95_ms": float(np.percentile(round_trips, 95)),
        "p99_ms": float(np.percentile(round_trips, 99)),
        "mean_ms": float(round_trips.mean()),
        "throughput_rps": len(out) / wall,
        "server_infer_ms_p50": float(np.percentile(infer, 50)),
        "server_queue_ms_p50": float(np.percentile(queue, 50)),
        "wall_s": wall,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json",
        default=str(pathlib.Path(__file__).parent / "results" / "serve_latency.json"),
        help="where to write the results (default: benchmarks/results/serve_latency.json)",
    )
    parser.add_argument("--requests", type=int, default=50, help="timed requests per client")
    parser.add_argument("--num-steps", type=int, default=10, help="Euler steps of the sampler")
    args = parser.parse_args(argv)

    from keras_openpi.models import Pi0
    from keras_openpi.tokenizers import ByteTokenizer

    model = Pi0(**DEMO_MODEL, vocabulary_size=ByteTokenizer.vocabulary_size, seed=0)
    with tempfile.TemporaryDirectory() as directory:
        model_path = pathlib.Path(directory) / "demo_pi0.keras"
        model.save(model_path)
        process, port = start_server(model_path, args.num_steps)
        try:
            results = [measure(port, clients, args.requests) for clients in CONCURRENCY]
        finally:
            process.terminate()
            process.wait(timeout=30)
    report = {
        "model": "keras-openpi demo π0 (3 cameras 96x96, horizon 10, action_dim 8)",
        "num_parameters": model.count_params(),
        "num_steps": args.num_steps,
        "results": results,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()),
        },
    }
    for row in results:
        print(
            f"{row['clients']} client(s): p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, "
            f"p99 {row['p99_ms']:.1f} ms, {row['throughput_rps']:.1f} requests/s "
            f"(server infer p50 {row['server_infer_ms_p50']:.1f} ms)"
        )
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
