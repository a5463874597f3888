"""Compiled programs and fine-tuning under PyTorch and TensorFlow.

`tests/test_backends.py` runs this file (with the openpi parity files) in a
subprocess per backend; pytest collects it only when it is named
on the command line. On JAX the same features are tested by
test_finetuning_memory.py, test_pi0_model.py and test_pi0_fast_model.py.
"""

import contextlib
import io
import warnings

import keras
import numpy as np
import pytest
from finetuning_helpers import NO_GRADIENT
from finetuning_helpers import VISION
from finetuning_helpers import VLM
from finetuning_helpers import check_two_steps
from finetuning_helpers import fit_two_steps
from finetuning_helpers import randomize_adapters
from finetuning_helpers import snapshot
from finetuning_helpers import tiny_pi0
from finetuning_helpers import training_batch
from keras.ops import convert_to_numpy
from training_support import TINY_SETS

from keras_openpi.cli import main
from keras_openpi.models.presets import DEMO_MODEL
from keras_openpi.convert import pi0_fast_from_openpi
from keras_openpi.data.procedural_source import ProceduralDataset
from keras_openpi.convert import pi0_from_openpi
from keras_openpi.data.procedural import make_reach_episodes
from keras_openpi.data.procedural import reach_batch
from keras_openpi.models import Pi0
from keras_openpi.models import Pi0Fast
from keras_openpi.serving import Policy
from keras_openpi.tokenizers import ByteTokenizer
from keras_openpi.training import make_distribution
from keras_openpi.training import read_metrics

BACKEND = keras.backend.backend()


# The parity files run the default programs (PyTorch eager, a TensorFlow graph
# without XLA on a CPU); this is XLA's. torch.compile takes too long on these
# models for CI: benchmarks/backend_latency.py measures it.
@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA programs are TensorFlow's (and JAX's)")
def test_openpi_parity_of_the_xla_programs(openpi_fixture):
    fixture = openpi_fixture("pi0")
    model = pi0_from_openpi(fixture.path, action_horizon=10, max_token_len=16, model="pi0")
    model.jit_compile = True
    sampled = model.sample_actions(
        fixture.observation(model.image_keys), noise=fixture["input/noise"], num_steps=10
    )
    np.testing.assert_allclose(
        convert_to_numpy(sampled), fixture["output/sampled"], atol=1e-4, rtol=0
    )

    fast_fixture = openpi_fixture("pi0_fast")
    fast = pi0_fast_from_openpi(fast_fixture.path, action_dim=6, action_horizon=5, max_token_len=24)
    fast.jit_compile = True
    observation = {
        "image": {k: fast_fixture[f"input/images/{k}"] for k in fast.image_keys},
        "image_mask": {k: fast_fixture[f"input/masks/{k}"] for k in fast.image_keys},
        "tokenized_prompt": fast_fixture["input/toks"],
        "tokenized_prompt_mask": fast_fixture["input/prefix_tmask"],
    }
    tokens, logits = fast.generate(observation, max_decoding_steps=12, return_logits=True)
    np.testing.assert_array_equal(
        convert_to_numpy(tokens), fast_fixture["output/greedy_tokens"].astype(np.int32)
    )
    np.testing.assert_allclose(
        convert_to_numpy(logits), fast_fixture["output/decode_logits"], atol=1e-4, rtol=0
    )


def test_sampling_program_matches_eager_and_follows_the_weights():
    model = tiny_pi0()
    observation, actions = training_batch(model, size=2)
    noise = np.random.default_rng(1).normal(size=actions.shape).astype("float32")

    def sample(eagerly):
        model.run_eagerly = eagerly
        return convert_to_numpy(model.sample_actions(observation, noise=noise, num_steps=3))

    base = sample(False)
    np.testing.assert_allclose(base, sample(True), atol=1e-5, rtol=0)
    # New variables (adapters): the program is rebuilt, not run on the old weights.
    model.enable_lora(rank=2)
    randomize_adapters(model)
    adapted = sample(False)
    assert np.abs(adapted - base).max() > 1e-2
    np.testing.assert_allclose(adapted, sample(True), atol=1e-5, rtol=0)
    model.merge_lora()
    np.testing.assert_allclose(sample(False), adapted, atol=1e-5, rtol=0)


def test_pi0_fast_sampling_is_seeded_in_and_out_of_the_program():
    keras.utils.set_random_seed(0)
    model = Pi0Fast(VLM, VISION, vocabulary_size=64, max_token_len=6, image_resolution=(32, 32))
    observation = model.dummy_observation(batch_size=2)
    start = convert_to_numpy(model.seed_generator.state)

    def generate(eagerly):
        model.run_eagerly = eagerly
        return convert_to_numpy(model.generate(observation, max_decoding_steps=8, temperature=1.0))

    compiled = generate(False)
    model.seed_generator.state.assign(start)
    eager = generate(True)
    assert compiled.shape == (2, 8) and compiled.dtype == np.int32
    assert ((compiled >= 0) & (compiled < 64)).all()
    np.testing.assert_array_equal(compiled, eager)
    assert not np.array_equal(generate(False), compiled)  # the generator moved on


def test_lora_fit_on_the_demo_task_moves_only_the_adapters(tmp_path):
    """`enable_lora` then `fit` (Keras' own train step of the backend) on the demo's task and model."""
    keras.utils.set_random_seed(0)
    tokenizer = ByteTokenizer(DEMO_MODEL["max_token_len"])
    episodes = make_reach_episodes(1, seed=0, image_size=DEMO_MODEL["image_resolution"][0])
    observation, actions = reach_batch(
        episodes, tokenizer, DEMO_MODEL["action_dim"], DEMO_MODEL["action_horizon"]
    )
    observation = keras.tree.map_structure(lambda x: x[:12], observation)
    model = Pi0(**DEMO_MODEL, vocabulary_size=tokenizer.vocabulary_size, seed=0)
    model.enable_lora(rank=4)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gradients do not exist for variables")
        history = model.fit(
            observation, actions[:12], batch_size=4, epochs=1, shuffle=False, verbose=0
        )
    assert int(convert_to_numpy(model.optimizer.iterations)) == 3
    assert np.isfinite(history.history["loss"]).all()

    after = snapshot(model)
    frozen = [path for path, (_, trainable) in before.items() if not trainable]
    adapters = [
        path for path in before if "lora_kernel" in path and not NO_GRADIENT.fullmatch(path)
    ]
    # Both experts' 7 maps in 2 blocks, A and B, less the 5 VLM maps of the last block.
    assert len(adapters) == 2 * 2 * 7 * 2 - 5 * 2
    # Each expert's 2 norms and 7 base kernels in 2 blocks, the token embedding, 2 final norms.
    assert len(frozen) == 2 * 2 * 9 + 3 and all("lora_kernel" not in path for path in frozen)
    assert [p for p in frozen if not np.array_equal(before[p][0], after[p][0])] == []
    assert [p for p in adapters if np.array_equal(before[p][0], after[p][0])] == []

    model.save(tmp_path / "demo_lora.keras")
    reloaded = keras.saving.load_model(tmp_path / "demo_lora.keras")
    noise = np.random.default_rng(2).normal(size=(2, 10, 8)).astype("float32")
    first_two = keras.tree.map_structure(lambda x: x[:2], observation)
    np.testing.assert_allclose(
        convert_to_numpy(reloaded.sample_actions(first_two, noise=noise)),
        convert_to_numpy(model.sample_actions(first_two, noise=noise)),
        atol=1e-6,
        rtol=0,
    )


def test_bfloat16_frozen_weights_and_remat_train_compiled(tmp_path):
    model = tiny_pi0()
    model.apply_strategy("lora", rank=2, frozen_dtype="bfloat16", remat=True)
    assert {str(v.dtype) for v in model.weights if not v.trainable} == {"bfloat16"}
    model.compile(optimizer=keras.optimizers.Adam(1e-3))  # the backend's compiled train step
    observation, actions = training_batch(model)
    before = snapshot(model)
    model.fit(observation, actions, batch_size=2, shuffle=False, verbose=0)
    check_two_steps(model, before)
    model.save(tmp_path / "bf16.keras")
    reloaded = keras.saving.load_model(tmp_path / "bf16.keras")
    assert reloaded.finetuning_state.remat and reloaded.finetuning_state.frozen_dtype == "bfloat16"
    saved = snapshot(model)
    for path, (value, trainable) in snapshot(reloaded).items():
        np.testing.assert_array_equal(value, saved[path][0], err_msg=path)
        assert trainable == saved[path][1], path


def test_int8_frozen_base_trains_the_adapters():
    model = tiny_pi0()
    model.apply_strategy("lora", rank=2, quantize="int8")
    assert model.gemma.decoder_blocks[0].experts[0].attention.query.quantization_mode == "int8"
    before = snapshot(model)
    fit_two_steps(model)
    check_two_steps(model, before)


def test_keras_openpi_train_runs_checkpoints_and_resumes(tmp_path):
    """`keras-openpi train` and a `Policy` on this backend: Keras' own step, no `keras.distribution`."""
    run = tmp_path / "run"
    sets = [*TINY_SETS, "batch_size=4", f"assets_dir={tmp_path / 'assets'}"]
    args = ["train", "--config", "demo", "--checkpoint-dir", str(run)]
    args += [arg for item in sets for arg in ("--set", item)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--max-steps", "2"]) == 0
        assert main([*args, "--max-steps", "3", "--resume"]) == 0
    losses = [row["loss"] for row in read_metrics(run / "metrics.csv")]
    assert len(losses) == 3 and np.isfinite(losses).all()
    policy = Policy.from_checkpoint(run / "export" / "policy.keras", seed=0)
    frame = ProceduralDataset(1, image_size=32)[0]
    observation = {"image": frame["image"], "state": frame["state"], "prompt": frame["prompt"]}
    actions = policy.infer(observation)["actions"]
    assert actions.shape == (10, 8) and np.isfinite(actions).all()
    with pytest.raises(ValueError, match=f"fsdp_devices=2 needs keras.distribution, which the '{BACKEND}'"):
        make_distribution(fsdp_devices=2)
