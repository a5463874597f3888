"""Running keras_openpi under another Keras backend, and moving `.keras` files between backends.

Keras fixes its backend when it is imported, so the PyTorch and TensorFlow
runs are subprocesses with `KERAS_BACKEND` set (`run_on_backend`). As a
script, `python tests/backend_support.py SRC DST SEED` is one hop of the
`.keras` round trip: it loads the LoRA models saved in SRC, checks that they
reproduce SRC's outputs and LoRA structure, moves their adapters (seeded by
SEED), and saves the models with their new outputs to DST.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
OTHER_BACKENDS = ("torch", "tensorflow")
ATOL = 1e-4  # float32 parity across backends, as against openpi's outputs
FAST_TOKENS = 6


def run_on_backend(backend, args, timeout):
    """Runs `python *args` in the repository with `KERAS_BACKEND=backend`."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def failure_report(result):
    return (
        f"exit code {result.returncode}\n--- stdout (end)\n{result.stdout[-8000:]}"
        f"\n--- stderr (end)\n{result.stderr[-4000:]}"
    )


def build_models():
    """A π0 and a π0-FAST with LoRA (alpha != rank, frozen vision) and non-zero adapters."""
    from finetuning_helpers import VISION
    from finetuning_helpers import VLM
    from finetuning_helpers import randomize_adapters
    from finetuning_helpers import tiny_pi0

    from keras_openpi.models import Pi0Fast

    pi0 = tiny_pi0()
    pi0.apply_strategy(
        "lora",
        rank={"vlm": 4, "action_expert": 2},
        alpha={"vlm": 8, "action_expert": 3},
        freeze_vision=True,
    )
    fast = Pi0Fast(
        VLM,
        VISION,
        vocabulary_size=64,
        max_token_len=6,
        image_keys=("base_0_rgb", "wrist_0_rgb"),
        image_resolution=(32, 32),
        seed=0,
    )
    fast.enable_lora(rank=2, alpha=5.0)
    models = {"pi0_lora": pi0, "pi0_fast_lora": fast}
    for model in models.values():
        randomize_adapters(model, seed=1, scale=0.2)
    return models


def _inputs(models):
    from finetuning_helpers import training_batch

    observation, actions = training_batch(models["pi0_lora"], size=2, seed=5)
    noise = np.random.default_rng(6).normal(size=actions.shape).astype("float32")
    fast = models["pi0_fast_lora"]
    rng = np.random.default_rng(7)
    fast_observation = {
        "image": {
            k: rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32") for k in fast.image_keys
        },
        "tokenized_prompt": rng.integers(2, fast.vocabulary_size, (2, 6)).astype("int32"),
        "tokenized_prompt_mask": np.array([[1] * 6, [1] * 4 + [0] * 2], bool),
    }
    return observation, noise, fast_observation


def outputs(models):
    """π0's sampled actions for fixed noise; π0-FAST's greedy tokens and their logits."""
    from keras import ops

    observation, noise, fast_observation = _inputs(models)
    actions = models["pi0_lora"].sample_actions(observation, noise=noise, num_steps=4)
    tokens, logits = models["pi0_fast_lora"].generate(
        fast_observation, max_decoding_steps=FAST_TOKENS, return_logits=True
    )
    return {
        "pi0_lora/actions": ops.convert_to_numpy(actions),
        "pi0_fast_lora/tokens": ops.convert_to_numpy(tokens),
        "pi0_fast_lora/logits": ops.convert_to_numpy(logits),
    }


def structure(models):
    """Each model's adapted layers with rank and alpha, and its trainable weights."""
    return {
        name: {
            "lora": sorted(
                [layer.path, layer.lora_rank, float(layer.lora_alpha)]
                for layer in model._flatten_layers()
                if getattr(layer, "lora_enabled", False)
            ),
            "trainable": sorted(v.path for v in model.trainable_weights),
            "finetuning": model.get_config()["finetuning"],
        }
        for name, model in models.items()
    }


def save(models, directory):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        model.save(directory / f"{name}.keras")
    np.savez(directory / "outputs.npz", **outputs(models))
    (directory / "structure.json").write_text(json.dumps(structure(models)))


def load_and_check(directory):
    """Loads the models saved in `directory`; asserts they reproduce its outputs and structure."""
    import keras

    directory = pathlib.Path(directory)
    models = {
        name: keras.saving.load_model(directory / f"{name}.keras")
        for name in ("pi0_lora", "pi0_fast_lora")
    }
    saved = json.loads((directory / "structure.json").read_text())
    assert json.loads(json.dumps(structure(models))) == saved
    got = outputs(models)
    with np.load(directory / "outputs.npz") as expected:
        assert sorted(expected.files) == sorted(got)
        for key in expected.files:
            if key.endswith("tokens"):
                np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
            else:
                np.testing.assert_allclose(got[key], expected[key], atol=ATOL, rtol=0, err_msg=key)
    return models, got


def main(source, destination, seed):
    import keras
    from finetuning_helpers import randomize_adapters

    models, got = load_and_check(source)
    for model in models.values():
        randomize_adapters(model, seed=int(seed), scale=0.2)
    save(models, destination)
    print(
        f"{keras.backend.backend()}: loaded {source} (actions max |a| "
        f"{np.abs(got['pi0_lora/actions']).max():.4f}), saved {destination}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
