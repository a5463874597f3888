"""π0-FAST decoding speed: prefill latency, decode tokens/s, and worst-case action latency.

A small π0-FAST (SigLIP `tiny/16` at 224x224 on three cameras, a Gemma of
width 256 and depth 4, PaliGemma's full 257,152-token vocabulary, random
weights, float32) decodes with `generate`, one compiled program per shape.
`eos_token_id=-1` keeps every run to its step limit, so the figures are for
a fixed number of tokens. Reported, per batch size (median of `--repeats`
runs after a warm-up compile):

- `prefill_ms`: `generate(max_decoding_steps=1)` (images, prefix, one token);
- `decode_tokens_per_s`: `B * (S - 1) / (t(S) - t(1))` for S = `--steps`;
- `action_latency_ms`: `generate(max_decoding_steps=256)` at B = 1, openpi's
  default step limit (the worst case of one robot query; decoding the tokens
  into actions adds well under a millisecond).

Usage:
    python benchmarks/pi0_fast_decode.py [--json PATH] [--steps N] [--repeats N]
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_openpi.models import Pi0Fast  # noqa: E402

GEMMA = dict(width=256, depth=4, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=32)


def observation(model, batch, seed=0):
    rng = np.random.default_rng(seed)
    length = model.max_token_len
    valid = np.arange(length) < 40
    return {
        "image": {
            k: rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8) for k in model.image_keys
        },
        "tokenized_prompt": rng.integers(2, 1000, (batch, length)).astype(np.int32),
        "tokenized_prompt_mask": np.broadcast_to(valid, (batch, length)).copy(),
    }


def timed(fn, repeats):
    np.asarray(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/pi0_fast_decode.json")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    model = Pi0Fast(GEMMA, "tiny/16", max_token_len=64, eos_token_id=-1, seed=0)
    results = {
        "backend": keras.backend.backend(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "model": {
            "gemma": GEMMA,
            "vision": "tiny/16",
            "vocabulary_size": model.vocabulary_size,
            "max_token_len": model.max_token_len,
            "parameters": model.count_params(),
        },
        "steps": args.steps,
        "batches": {},
    }
    for batch in args.batch_sizes:
        obs = observation(model, batch)
        one = timed(lambda obs=obs: model.generate(obs, max_decoding_steps=1), args.repeats)
        many = timed(lambda obs=obs: model.generate(obs, max_decoding_steps=args.steps), args.repeats)
        results["batches"][str(batch)] = {
            "prefill_ms": round(1000 * one, 2),
            "decode_tokens_per_s": round(batch * (args.steps - 1) / (many - one), 1),
        }
        print(f"B={batch}: {results['batches'][str(batch)]}", flush=True)
    obs = observation(model, 1)
    latency = timed(lambda: model.generate(obs, max_decoding_steps=256), args.repeats)
    results["action_latency_ms"] = round(1000 * latency, 1)
    print(f"action latency (B=1, 256 tokens): {results['action_latency_ms']} ms")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
