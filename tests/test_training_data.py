"""A config's data on a LeRobot LIBERO dataset: repack, robot, deltas, norm stats, batches."""

import numpy as np
import pytest

from keras_openpi.data.lerobot_writer import write_lerobot_dataset
from keras_openpi.data.normalize import load_norm_stats
from keras_openpi.tokenizers import ByteTokenizer
from keras_openpi.training import Trainer
from keras_openpi.training import apply_overrides
from keras_openpi.training import get_config
from training_support import TINY_MODEL_SETS

HORIZON = 10


def libero_episodes(count=2, length=12, seed=0):
    """Episodes with LIBERO's LeRobot features (physical-intelligence/libero)."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        yield {
            "image": rng.integers(0, 256, (length, 32, 32, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (length, 32, 32, 3), dtype=np.uint8),
            "state": rng.normal(size=(length, 8)).astype(np.float32),
            "actions": rng.normal(size=(length, 7)).astype(np.float32),
            "task": f"put the bowl on plate {index}",
        }


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("libero")
    dataset = write_lerobot_dataset(root / "libero", libero_episodes(), fps=10, use_videos=False)
    config = apply_overrides(
        get_config("pi0_libero"),
        [
            *TINY_MODEL_SETS,
            "base_weights=",
            "tokenizer=byte",
            f"data.path={dataset}",
            f"assets_dir={root / 'assets'}",
            "batch_size=4",
        ],
    )
    return Trainer(config, checkpoint_dir=root / "run", log=None).prepare()


def test_norm_stats_are_computed_after_the_repack_and_robot_transforms(trainer):
    path = trainer.config.assets_dirs / "physical-intelligence/libero" / "norm_stats.json"
    assert trainer.norm_stats_origin == str(path)
    stats = load_norm_stats(path)
    assert (stats["state"].dim, stats["actions"].dim) == (8, 7)  # unpadded
    # openpi's chunks of delta actions: joints relative to the frame's state, gripper absolute.
    episodes = list(libero_episodes())
    chunks = []
    for episode in episodes:
        length = len(episode["actions"])
        for frame in range(length):
            chunk = episode["actions"][np.minimum(frame + np.arange(HORIZON), length - 1)].astype(
                np.float64
            )
            chunk[:, :6] -= episode["state"][frame, :6]
            chunks.append(chunk)
    chunks = np.concatenate(chunks)
    np.testing.assert_allclose(stats["actions"].mean, chunks.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["actions"].std, chunks.std(axis=0), rtol=1e-5, atol=1e-6)


def test_batches_are_the_models_inputs(trainer):
    observation, actions = trainer.loader[0]
    assert sorted(observation["image"]) == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    assert observation["image"]["base_0_rgb"].shape == (4, 32, 32, 3)
    assert (
        observation["image_mask"]["right_wrist_0_rgb"].tolist() == [False] * 4
    )  # LIBERO has no right wrist
    assert observation["state"].shape == (4, 8) and actions.shape == (4, HORIZON, 8)
    np.testing.assert_array_equal(actions[..., 7:], 0.0)  # padded to the model's action_dim
    prompts = {ByteTokenizer(32).decode(ids) for ids in observation["tokenized_prompt"]}
    assert prompts <= {"put the bowl on plate 0", "put the bowl on plate 1"}
    assert trainer.asset_id == "physical-intelligence/libero"


def test_openpi_weights_start_the_lora_config(trainer, tmp_path):
    from conftest import fixture_path
    from keras_openpi.convert import load_openpi_params

    weights = fixture_path("pi0_checkpoint") / "params"
    config = apply_overrides(
        get_config("pi0_libero_lora"),
        [
            f"weights={weights}",
            "tokenizer=byte",
            f"data.path={trainer.config.data.path}",
            f"assets_dir={tmp_path / 'assets'}",
            "batch_size=2",
        ],
    )
    lora = Trainer(config, checkpoint_dir=tmp_path / "run", log=None)
    model = lora.build()
    params = load_openpi_params(weights)
    kernel = model.get_layer("action_in_proj").kernel
    np.testing.assert_array_equal(kernel.numpy(), params["action_in_proj/kernel"])
    assert model.gemma.token_embedding.embeddings.dtype == "bfloat16"  # frozen, as openpi stores it
    assert model.finetuning_state.lora == {
        "vlm": {"rank": 16, "alpha": 16.0},
        "action_expert": {"rank": 32, "alpha": 32.0},
    }
    assert not model.optimizer.use_ema and model.dtype_policy.name == "mixed_bfloat16"
    # The data follow the checkpoint's architecture (its 224x224 cameras, action_dim 8).
    observation, actions = lora.loader[0]
    assert observation["image"]["base_0_rgb"].shape == (2, 224, 224, 3)
    assert observation["tokenized_prompt"].shape == (2, 48) and actions.shape == (2, 50, 8)


def test_openpi_fast_weights_start_the_fast_lora_config(trainer, tmp_path):
    """openpi's π0-FAST checkpoint, LoRA on its Gemma; batches carry the FAST token masks."""
    from conftest import fixture_path
    from fast_support import write_tokenizer_files

    from keras_openpi.convert import load_openpi_params

    weights = fixture_path("pi0_fast.npz")
    model_path, fast_dir = write_tokenizer_files(tmp_path / "tokenizer", HORIZON, 7)
    overrides = [
        f"weights={weights}",
        f"tokenizer={model_path}",
        f"fast_tokenizer={fast_dir}",
        f"data.path={trainer.config.data.path}",
        f"assets_dir={tmp_path / 'assets'}",
        "batch_size=2",
    ]
    config = apply_overrides(get_config("pi0_fast_libero_low_mem_finetune"), overrides)
    lora = Trainer(config, checkpoint_dir=tmp_path / "run", log=None)
    model = lora.build()
    params = load_openpi_params(weights)
    np.testing.assert_array_equal(
        model.vision_encoder.patch_embedding.kernel.numpy(),
        params["PaliGemma/img/embedding/kernel"],
    )
    assert model.model_type == "pi0_fast" and model.vocabulary_size == 1024  # the checkpoint's
    assert model.finetuning_state.lora == {"vlm": {"rank": 16, "alpha": 16.0}}
    assert model.gemma.token_embedding.embeddings.dtype == "bfloat16"  # frozen, as openpi
    assert model.tokenizer.tokenizer.max_len == 180 and not model.optimizer.use_ema
    observation, actions = lora.loader[0]
    assert sorted(observation["image"]) == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    assert observation["image_mask"]["right_wrist_0_rgb"].tolist() == [True, True]  # openpi's
    assert observation["state"].shape == (2, 8) and actions.shape == (2, HORIZON, 7)  # unpadded
    for key in ("tokenized_prompt", "token_ar_mask", "token_loss_mask"):
        assert observation[key].shape == (2, 180)
    assert observation["token_loss_mask"].any(axis=1).all()  # every sample has its actions

    overrides = [overrides[0], "tokenizer=byte", *overrides[3:]]
    config = apply_overrides(get_config("pi0_libero"), overrides)
    with pytest.raises(
        ValueError,
        match=f"the weights {weights} are a π0-FAST model; config 'pi0_libero' trains π0 "
        r"\(model_type pi0\)\.",
    ):
        Trainer(config, checkpoint_dir=tmp_path / "pi0", log=None).prepare()
