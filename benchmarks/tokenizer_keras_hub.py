"""What keras-hub's `PaliGemmaTokenizer` costs next to SentencePiece alone, per process.

`keras_openpi.tokenizers.PaliGemmaTokenizer` encodes with SentencePiece
directly; keras-hub's `PaliGemmaTokenizer` layer calls the same encoder on
its Python path, so both give the same ids (tests/test_tokenizer.py). This
measures what the layer adds in a fresh process, as a server or data-loader
worker would pay it:

- `import_s`, `import_rss_mb`: importing the tokenizer's module (keras-hub
  imports TensorFlow and TensorFlow Text whenever they are installed) and the
  process's peak resident memory after it.
- `construct_s`: building the tokenizer on a PaliGemma-sized vocabulary.
- `encode_us`: median microseconds to encode one prompt (raw ids).
- `same_ids`: the ids equal SentencePiece's on every prompt.

Modes: `sentencepiece` (this package's engine), `keras_hub` (as installed:
with TensorFlow when it is installed) and `keras_hub_without_tensorflow`
(TensorFlow hidden from the process, as in an install without the `rlds`
extra). The vocabulary is `--model` (e.g. PaliGemma's
`paligemma_tokenizer.model`) or, by default, a synthetic SentencePiece model
with PaliGemma's 257,152 pieces and special ids.

Usage:
    python benchmarks/tokenizer_keras_hub.py [--model PATH] [--repeats N] [--json PATH]
"""

import argparse
import io
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
MODES = ("sentencepiece", "keras_hub", "keras_hub_without_tensorflow")
PROMPTS = [
    "pick up the red cup and put it in the basket",
    "Task: fold the towel, State: 0 12 128 255 7 64 200 31;\nAction: ",
    "open the drawer, then close it",
    "grab the 🍎 and the 🍌",
]
VOCABULARY_SIZE = 257_152


def synthetic_paligemma_model(path):
    """A SentencePiece model with PaliGemma's vocabulary size and special pieces and ids."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(PROMPTS * 8),
        model_writer=proto,
        vocab_size=400,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto.getvalue())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    for i in range(VOCABULARY_SIZE - len(model.pieces)):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = f"<extra{i:06d}>", 0.0, user_defined
    path.write_bytes(model.SerializeToString())


def worker(mode, model_path, repeats):
    if mode == "keras_hub_without_tensorflow":
        sys.modules["tensorflow"] = None  # `import tensorflow` raises ImportError
        sys.modules["tensorflow_text"] = None
    start = time.perf_counter()
    if mode == "sentencepiece":
        import sentencepiece
    else:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        from keras_hub.models import PaliGemmaTokenizer
    import_s = time.perf_counter() - start
    import_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    proto = pathlib.Path(model_path).read_bytes()
    start = time.perf_counter()
    if mode == "sentencepiece":
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        encode = processor.encode
    else:
        tokenizer = PaliGemmaTokenizer(proto=proto)
        encode = tokenizer.tokenize
    construct_s = time.perf_counter() - start

    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_proto=proto)
    same_ids = all([int(i) for i in encode(p)] == reference.encode(p) for p in PROMPTS)
    times = []
    for _ in range(repeats):
        for prompt in PROMPTS:
            start = time.perf_counter()
            encode(prompt)
            times.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "tensorflow_imported": "tensorflow" in sys.modules
        and sys.modules["tensorflow"] is not None,
        "import_s": round(import_s, 3),
        "import_rss_mb": round(import_rss_mb, 1),
        "construct_s": round(construct_s, 3),
        "encode_us": round(statistics.median(times) * 1e6, 1),
        "same_ids": same_ids,
    }


def run(mode, model_path, repeats, timeout):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--model",
            str(model_path),
            "--repeats",
            str(repeats),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        return {"mode": mode, "error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT ") :])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a SentencePiece .model (default: a synthetic one)")
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--json",
        default=str(HERE / "results" / "tokenizer_keras_hub.json"),
        help="where to write the results (default: benchmarks/results/tokenizer_keras_hub.json)",
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.model, args.repeats)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if model_path is None:
            model_path = pathlib.Path(tmp) / "synthetic_paligemma.model"
            synthetic_paligemma_model(model_path)
        results = []
        for mode in MODES:
            results.append(run(mode, model_path, args.repeats, args.timeout))
            print(json.dumps(results[-1]), flush=True)
    report = {
        "benchmark": "tokenizer_keras_hub",
        "model": args.model or f"synthetic, {VOCABULARY_SIZE} pieces",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
